//! CPython's authkey handshake (`deliver_challenge` / `answer_challenge`), as pure logic
//! over a message transport, so it can be tested in memory and fuzzed.
//! See `specs/python-connection-protocol.md` §2.
//!
//! Two roles exist. The **challenger** ([`deliver_challenge`]) sends
//! `#CHALLENGE#{sha256}` + 40 random bytes, checks the HMAC the peer sends back, and
//! answers `#WELCOME#` or `#FAILURE#`. The **responder** ([`answer_challenge`]) computes
//! that HMAC and reads the verdict. A [`Listener`](super::Listener) runs challenger then
//! responder on every accepted connection; a [`Client`](super::Client) runs responder then
//! challenger, so both sides prove that they know the key.
//!
//! Both roles accept what CPython 3.11 (raw HMAC-MD5) and 3.12+ (`{digest}` prefixed
//! HMAC) send. Every handshake message is limited to 256 bytes.
//!
//! ```
//! use multiprocess::connection::auth::{answer_challenge, deliver_challenge, AuthPolicy};
//! let (a, b) = multiprocess::pipe()?;
//! let key = b"secret";
//! let peer = std::thread::spawn(move || answer_challenge(&mut &b, key));
//! deliver_challenge(&mut &a, key, &AuthPolicy::default())?;
//! peer.join().unwrap()?;
//! # Ok::<(), multiprocess::Error>(())
//! ```

use super::Connection;
use crate::error::{Error, Result};
use hmac::{Hmac, Mac};
use std::io::Read;
use subtle::ConstantTimeEq;

/// `#CHALLENGE#`, the tag that starts a challenge.
pub const CHALLENGE: &[u8] = b"#CHALLENGE#";
/// `#WELCOME#`, the verdict for a correct response.
pub const WELCOME: &[u8] = b"#WELCOME#";
/// `#FAILURE#`, the verdict for a wrong response.
pub const FAILURE: &[u8] = b"#FAILURE#";
/// The largest handshake message either side reads (CPython's `recv_bytes(256)`).
pub const MESSAGE_LIMIT: usize = 256;
/// Number of random bytes in a challenge we send (CPython 3.12+).
pub const NONCE_LEN: usize = 40;

/// Message transport the handshake runs over: whole messages, in order.
///
/// Implemented for `&Connection`; implement it for anything else (an in-memory queue,
/// a fuzzer's byte source) to run the handshake there.
pub trait Transport {
    /// Sends one whole message.
    fn send_message(&mut self, msg: &[u8]) -> Result<()>;
    /// Receives one whole message; a message longer than `limit` is an error.
    fn recv_message(&mut self, limit: usize) -> Result<Vec<u8>>;
}

impl Transport for &Connection {
    fn send_message(&mut self, msg: &[u8]) -> Result<()> {
        self.send_frame(msg, &[])
    }

    fn recv_message(&mut self, limit: usize) -> Result<Vec<u8>> {
        self.recv_frame(limit as u64, false)
    }
}

/// The HMAC digests CPython 3.12+ negotiates (Python `hashlib` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Digest {
    /// HMAC-MD5: what CPython 3.11 and older use (raw, unprefixed).
    Md5,
    /// HMAC-SHA256, the digest CPython 3.12+ asks for.
    Sha256,
    /// HMAC-SHA384.
    Sha384,
    /// HMAC-SHA3-256 (`sha3_256`).
    Sha3_256,
    /// HMAC-SHA3-384 (`sha3_384`).
    Sha3_384,
}

impl Digest {
    const ALL: [Digest; 5] = [
        Digest::Md5,
        Digest::Sha256,
        Digest::Sha384,
        Digest::Sha3_256,
        Digest::Sha3_384,
    ];

    /// The `hashlib` name, as written between braces on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Digest::Md5 => "md5",
            Digest::Sha256 => "sha256",
            Digest::Sha384 => "sha384",
            Digest::Sha3_256 => "sha3_256",
            Digest::Sha3_384 => "sha3_384",
        }
    }

    fn from_name(name: &[u8]) -> Option<Digest> {
        Digest::ALL
            .into_iter()
            .find(|d| d.name().as_bytes() == name)
    }

    /// HMAC of `msg` under `key` with this digest.
    pub fn hmac(self, key: &[u8], msg: &[u8]) -> Vec<u8> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
            // HMAC accepts keys of any length, so this cannot fail.
            let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Digest::Md5 => run::<Hmac<md5::Md5>>(key, msg),
            Digest::Sha256 => run::<Hmac<sha2::Sha256>>(key, msg),
            Digest::Sha384 => run::<Hmac<sha2::Sha384>>(key, msg),
            Digest::Sha3_256 => run::<Hmac<sha3::Sha3_256>>(key, msg),
            Digest::Sha3_384 => run::<Hmac<sha3::Sha3_384>>(key, msg),
        }
    }
}

/// How a challenge body or a response is to be read (spec §2.5 classification rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form<'a> {
    /// 16 or 20 bytes: CPython 3.11 style, raw HMAC-MD5, no prefix.
    Legacy(&'a [u8]),
    /// `{name}` + payload.
    Prefixed(Digest, &'a [u8]),
}

/// Classifies a challenge body or a response: 16 or 20 bytes are legacy; otherwise a
/// `{name}` prefix with one of the five digest names, the `}` at index 1..=9.
///
/// ```
/// use multiprocess::connection::auth::{classify, Digest, Form};
/// assert_eq!(classify(&[0; 20]), Some(Form::Legacy(&[0; 20])));
/// assert_eq!(classify(b"{sha256}abc"), Some(Form::Prefixed(Digest::Sha256, b"abc")));
/// assert_eq!(classify(b"{sha1}abc"), None);
/// ```
pub fn classify(body: &[u8]) -> Option<Form<'_>> {
    if body.len() == 16 || body.len() == 20 {
        return Some(Form::Legacy(body));
    }
    if body.first() != Some(&b'{') {
        return None;
    }
    let end = body.len().min(10);
    let close = body[1..end].iter().position(|&b| b == b'}')? + 1;
    let digest = Digest::from_name(&body[1..close])?;
    Some(Form::Prefixed(digest, &body[close + 1..]))
}

/// What the challenger accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    /// Accept HMAC-MD5 responses: the raw 16-byte form CPython 3.11 and older send, and
    /// `{md5}`. On by default; turning it off locks out CPython 3.11 peers.
    pub accept_md5: bool,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        AuthPolicy { accept_md5: true }
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn os_random(buf: &mut [u8]) -> Result<()> {
    let mut f = std::fs::File::open("/dev/urandom")?;
    f.read_exact(buf)?;
    Ok(())
}

/// Challenger with a fresh random challenge: authenticates the peer. On a wrong response
/// sends `#FAILURE#` and fails with [`Error::Authentication`]`("digest received was
/// wrong")`.
pub fn deliver_challenge<T: Transport + ?Sized>(
    t: &mut T,
    key: &[u8],
    policy: &AuthPolicy,
) -> Result<()> {
    let mut nonce = [0u8; NONCE_LEN];
    os_random(&mut nonce)?;
    deliver_challenge_with_nonce(t, key, policy, &nonce)
}

/// [`deliver_challenge`] with given random bytes (for tests and reproducible vectors;
/// never use a predictable nonce in production).
pub fn deliver_challenge_with_nonce<T: Transport + ?Sized>(
    t: &mut T,
    key: &[u8],
    policy: &AuthPolicy,
    nonce: &[u8; NONCE_LEN],
) -> Result<()> {
    let (body, challenge) = challenge_message(nonce);
    t.send_message(&challenge)?;
    let response = t.recv_message(MESSAGE_LIMIT)?;
    match verify(key, &body, &response, policy) {
        Ok(()) => t.send_message(WELCOME),
        Err(why) => {
            // Best effort: the peer may already be gone; the verdict of failure is ours.
            let _ = t.send_message(FAILURE);
            Err(Error::Authentication(why))
        }
    }
}

/// The challenger's first message for `nonce`: returns the challenge body (what the
/// peer's HMAC covers) and the whole message (`#CHALLENGE#` + body).
pub(crate) fn challenge_message(nonce: &[u8; NONCE_LEN]) -> (Vec<u8>, Vec<u8>) {
    let mut body = Vec::with_capacity(8 + NONCE_LEN);
    body.extend_from_slice(b"{sha256}");
    body.extend_from_slice(nonce);
    let mut challenge = CHALLENGE.to_vec();
    challenge.extend_from_slice(&body);
    (body, challenge)
}

/// Checks the peer's response to the challenge `body`; the error is the reason.
pub(crate) fn verify(
    key: &[u8],
    body: &[u8],
    response: &[u8],
    policy: &AuthPolicy,
) -> Result<(), String> {
    let (digest, mac) = match classify(response) {
        Some(Form::Legacy(mac)) => (Digest::Md5, mac),
        Some(Form::Prefixed(d, mac)) => (d, mac),
        None => {
            return Err(format!(
            "unsupported message length, missing digest prefix, or unsupported digest: message={}",
            escape(response)
        ))
        }
    };
    if digest == Digest::Md5 && !policy.accept_md5 {
        return Err("digest received was wrong (md5 is not accepted)".into());
    }
    let expected = digest.hmac(key, body);
    if expected.len() != mac.len() {
        return Err(format!(
            "expected {:?} of length {} got {}",
            digest.name(),
            expected.len(),
            mac.len()
        ));
    }
    if bool::from(expected.ct_eq(mac)) {
        Ok(())
    } else {
        Err("digest received was wrong".into())
    }
}

/// Responder: answers the peer's challenge and reads its verdict. Fails with
/// [`Error::Authentication`]`("digest sent was rejected")` if the peer rejects us.
pub fn answer_challenge<T: Transport + ?Sized>(t: &mut T, key: &[u8]) -> Result<()> {
    let msg = t.recv_message(MESSAGE_LIMIT)?;
    let response = response_to(key, &msg)?;
    t.send_message(&response)?;
    check_verdict(&t.recv_message(MESSAGE_LIMIT)?)
}

/// The responder's answer to the challenge message `msg` (`#CHALLENGE#` + body).
pub(crate) fn response_to(key: &[u8], msg: &[u8]) -> Result<Vec<u8>> {
    let Some(body) = msg.strip_prefix(CHALLENGE) else {
        return Err(Error::Authentication(format!(
            "Protocol error, expected challenge: {}",
            escape(msg)
        )));
    };
    if body.len() < 20 {
        return Err(Error::Authentication(format!(
            "challenge too short: {} bytes",
            body.len()
        )));
    }
    match classify(body) {
        Some(Form::Legacy(_)) => Ok(Digest::Md5.hmac(key, body)),
        Some(Form::Prefixed(d, _)) => {
            let mut r = format!("{{{}}}", d.name()).into_bytes();
            r.extend_from_slice(&d.hmac(key, body));
            Ok(r)
        }
        None => Err(Error::Authentication(format!(
            "unsupported message length, missing digest prefix, or unsupported digest: message={}",
            escape(body)
        ))),
    }
}

/// The responder's reading of the challenger's verdict.
pub(crate) fn check_verdict(verdict: &[u8]) -> Result<()> {
    if verdict == WELCOME {
        Ok(())
    } else {
        Err(Error::Authentication("digest sent was rejected".into()))
    }
}

/// A short printable rendering of peer bytes for error messages.
fn escape(b: &[u8]) -> String {
    let shown: String = b
        .iter()
        .take(64)
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect();
    if b.len() > 64 {
        format!("b'{shown}'...")
    } else {
        format!("b'{shown}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Replays scripted incoming messages and records outgoing ones.
    #[derive(Default)]
    struct Script {
        incoming: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl Transport for Script {
        fn send_message(&mut self, msg: &[u8]) -> Result<()> {
            self.sent.push(msg.to_vec());
            Ok(())
        }
        fn recv_message(&mut self, limit: usize) -> Result<Vec<u8>> {
            let m = self.incoming.pop_front().ok_or(Error::Eof)?;
            if m.len() > limit {
                return Err(Error::protocol("bad message length"));
            }
            Ok(m)
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn nonce(start: u8) -> [u8; 40] {
        std::array::from_fn(|i| start + i as u8)
    }

    fn challenge_frame(start: u8) -> Vec<u8> {
        let mut c = b"#CHALLENGE#{sha256}".to_vec();
        c.extend_from_slice(&nonce(start));
        c
    }

    const A2: &str = "7b 73 68 61 32 35 36 7d fc 57 fb e6 50 d6 12 4b 98 21 5e 7b 5d 19 7d 58
                      07 ad 69 98 2d 27 5a 97 35 ea 2d 56 f1 fa 69 89";
    const A5: &str = "7b 73 68 61 32 35 36 7d 86 ee 88 93 01 f5 0c 06 23 fc bc fa 57 96 2d b6
                      c2 5c 73 e7 a8 e6 49 09 39 a4 a0 bf 7c 01 8f d7";

    #[test]
    fn vector_a_challenger() {
        let mut s = Script::default();
        s.incoming.push_back(hex(A2));
        deliver_challenge_with_nonce(&mut s, b"secret", &AuthPolicy::default(), &nonce(0)).unwrap();
        assert_eq!(s.sent.len(), 2);
        assert_eq!(s.sent[0].len(), 0x3b);
        assert_eq!(s.sent[0], challenge_frame(0));
        assert_eq!(s.sent[1], WELCOME);
    }

    #[test]
    fn vector_a_responder() {
        let mut s = Script::default();
        s.incoming.push_back(challenge_frame(0x40));
        s.incoming.push_back(WELCOME.to_vec());
        answer_challenge(&mut s, b"secret").unwrap();
        assert_eq!(s.sent, vec![hex(A5)]);
        // And frame 2 of vector A, from the other responder.
        let mut s = Script::default();
        s.incoming.push_back(challenge_frame(0));
        s.incoming.push_back(WELCOME.to_vec());
        answer_challenge(&mut s, b"secret").unwrap();
        assert_eq!(s.sent, vec![hex(A2)]);
    }

    #[test]
    fn vector_b_legacy_responder() {
        for (start, want) in [
            (0u8, "7d ef a9 cc 46 ab c3 58 33 25 d1 7c cd a7 51 90"),
            (0x40, "14 ec 56 40 2a a6 b6 d8 62 9d 67 84 8f fd fa 71"),
        ] {
            let mut s = Script::default();
            let mut c = CHALLENGE.to_vec();
            c.extend((0..20).map(|i| start + i));
            assert_eq!(c.len(), 0x1f);
            s.incoming.push_back(c);
            s.incoming.push_back(WELCOME.to_vec());
            answer_challenge(&mut s, b"secret").unwrap();
            assert_eq!(s.sent, vec![hex(want)]);
        }
    }

    #[test]
    fn vector_c_legacy_response_accepted_by_modern_challenger() {
        let c2 = hex("8e 48 d2 bb 34 9b 4b 72 b9 38 29 99 ed 5b 62 eb");
        let mut s = Script::default();
        s.incoming.push_back(c2.clone());
        deliver_challenge_with_nonce(&mut s, b"secret", &AuthPolicy::default(), &nonce(0)).unwrap();
        assert_eq!(s.sent[1], WELCOME);
        // With MD5 switched off, the same response is refused.
        let mut s = Script::default();
        s.incoming.push_back(c2);
        let e = deliver_challenge_with_nonce(
            &mut s,
            b"secret",
            &AuthPolicy { accept_md5: false },
            &nonce(0),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Authentication(_)));
        assert_eq!(s.sent[1], FAILURE);
    }

    #[test]
    fn vector_d_wrong_key() {
        let d2 = hex(
            "7b 73 68 61 32 35 36 7d c2 6d 74 60 dd 15 c6 dd 4a a9 29 17 82 1a fa 7f 1a 9e 7c 80
             ee 05 53 b0 31 8c cc 37 a2 fb 37 3a",
        );
        // Our responder with the wrong key produces exactly that.
        let mut s = Script::default();
        s.incoming.push_back(challenge_frame(0));
        s.incoming.push_back(FAILURE.to_vec());
        let e = answer_challenge(&mut s, b"wrong").unwrap_err();
        assert_eq!(s.sent, vec![d2.clone()]);
        assert!(
            matches!(&e, Error::Authentication(m) if m == "digest sent was rejected"),
            "{e}"
        );
        // Our challenger rejects it with #FAILURE#.
        let mut s = Script::default();
        s.incoming.push_back(d2);
        let e = deliver_challenge_with_nonce(&mut s, b"secret", &AuthPolicy::default(), &nonce(0))
            .unwrap_err();
        assert_eq!(hex("23 46 41 49 4c 55 52 45 23"), FAILURE);
        assert_eq!(s.sent[1], FAILURE);
        assert!(
            matches!(&e, Error::Authentication(m) if m == "digest received was wrong"),
            "{e}"
        );
    }

    #[test]
    fn every_digest_is_accepted_and_answered() {
        for d in Digest::ALL {
            let body = [b"{".as_slice(), d.name().as_bytes(), b"}", &[7u8; 40]].concat();
            let mut s = Script::default();
            let mut c = CHALLENGE.to_vec();
            c.extend_from_slice(&body);
            s.incoming.push_back(c);
            s.incoming.push_back(WELCOME.to_vec());
            answer_challenge(&mut s, b"k").unwrap();
            let resp = s.sent.pop().unwrap();
            assert_eq!(
                classify(&resp),
                Some(Form::Prefixed(d, &d.hmac(b"k", &body)[..]))
            );
            // The challenger accepts this digest in a response to its {sha256} challenge.
            let mut s = Script::default();
            let mut resp = format!("{{{}}}", d.name()).into_bytes();
            let mut chal = b"{sha256}".to_vec();
            chal.extend_from_slice(&nonce(0));
            resp.extend_from_slice(&d.hmac(b"k", &chal));
            s.incoming.push_back(resp);
            deliver_challenge_with_nonce(&mut s, b"k", &AuthPolicy::default(), &nonce(0)).unwrap();
        }
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let cases: Vec<Vec<u8>> = vec![
            b"hello".to_vec(),
            b"#CHALLENGE#short".to_vec(),
            b"#CHALLENGE#{sha1}0123456789012345678901234567890".to_vec(),
            b"#CHALLENGE#{sha256".to_vec(),
            vec![],
        ];
        for c in cases {
            let mut s = Script::default();
            s.incoming.push_back(c);
            assert!(matches!(
                answer_challenge(&mut s, b"k"),
                Err(Error::Authentication(_))
            ));
            assert!(s.sent.is_empty());
        }
        for r in [vec![], vec![b'{'; 30], b"{sha256}".to_vec(), vec![0; 17]] {
            let mut s = Script::default();
            s.incoming.push_back(r);
            let e = deliver_challenge(&mut s, b"k", &AuthPolicy::default()).unwrap_err();
            assert!(matches!(e, Error::Authentication(_)), "{e}");
            assert_eq!(s.sent.last().unwrap(), FAILURE);
        }
    }

    #[test]
    fn empty_key_is_a_key() {
        let (a, b) = crate::pipe().unwrap();
        let t = std::thread::spawn(move || answer_challenge(&mut &b, b""));
        deliver_challenge(&mut &a, b"", &AuthPolicy::default()).unwrap();
        t.join().unwrap().unwrap();
    }
}
