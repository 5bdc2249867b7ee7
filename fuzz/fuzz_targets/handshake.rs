//! Both handshake roles against arbitrary peer messages: typed errors only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprocess::connection::auth::{
    answer_challenge, deliver_challenge_with_nonce, AuthPolicy, Transport,
};
use multiprocess::{Error, Result};

/// Peer messages come from the input: one length byte, then that many bytes.
struct Peer<'a> {
    data: &'a [u8],
    sent: usize,
}

impl Transport for Peer<'_> {
    fn send_message(&mut self, msg: &[u8]) -> Result<()> {
        assert!(msg.len() <= 256);
        self.sent += 1;
        Ok(())
    }
    fn recv_message(&mut self, limit: usize) -> Result<Vec<u8>> {
        let (&n, rest) = self.data.split_first().ok_or(Error::Eof)?;
        let n = (n as usize).min(rest.len());
        let (m, rest) = rest.split_at(n);
        self.data = rest;
        if m.len() > limit {
            return Err(Error::Protocol("too long".into()));
        }
        Ok(m.to_vec())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let key: &[u8] = if mode & 2 == 0 { b"secret" } else { b"" };
    let policy = AuthPolicy { accept_md5: mode & 4 == 0 };
    let mut p = Peer { data, sent: 0 };
    let r = if mode & 1 == 0 {
        answer_challenge(&mut p, key)
    } else {
        deliver_challenge_with_nonce(&mut p, key, &policy, &[7; 40])
    };
    if let Err(e) = r {
        assert!(
            matches!(e, Error::Authentication(_) | Error::Eof | Error::Protocol(_)),
            "{e}"
        );
    }
});
