//! Arbitrary bytes as a manager request and as a manager reply: the decoders (expansion,
//! depth and digit checks, opcode walker, serde-pickle) must return a value or a typed
//! error — never panic, overflow the stack, hang or blow up memory. A decoded request
//! must re-encode and decode to the same request, and whatever passes must survive what
//! the server does with it: clone, `repr`, encode, drop. Run with large inputs and the
//! nesting dictionary (see README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprocess::managers::wire::{
    decode_reply, decode_request, decode_value_fast, encode_request, repr_value,
};

fuzz_target!(|data: &[u8]| {
    // The decoders contain serde-pickle's panics (catch_unwind); libfuzzer-sys's hook
    // would abort on those contained panics, so use a quiet one. A panic that escapes a
    // decoder still fails the run (libfuzzer-sys catches it and aborts).
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(req) = decode_request(data) {
        let again = encode_request(req.ident.as_deref(), &req.method, &req.args, &req.kwargs);
        // Our own encoding decodes, except where serde-pickle cannot order set or dict
        // keys (NaN next to big integers), which it reports as an error.
        let back = match decode_request(&again) {
            Ok(back) => back,
            Err(e) => {
                assert!(e.to_string().contains("unorderable"), "{e}");
                return;
            }
        };
        // NaN floats compare unequal (and make sets order and deduplicate their items
        // differently on each decoding), and big integers' decimal text is slow:
        // compare the shape, and encode once more.
        let _ = encode_request(back.ident.as_deref(), &back.method, &back.args, &back.kwargs);
        assert_eq!((&back.ident, &back.method), (&req.ident, &req.method));
        assert_eq!((back.args.len(), back.kwargs.len()), (req.args.len(), req.kwargs.len()));
        let copy = req.clone();
        for a in &copy.args {
            let _ = repr_value(a);
        }
        drop(copy);
    }
    let _ = decode_reply(data);
    // The fast decoder agrees with serde-pickle wherever both decode (only when the
    // fast one succeeds: then there are no memo references, so serde-pickle cannot
    // blow up).
    if let Some(fast) = decode_value_fast(data) {
        let general = std::panic::catch_unwind(|| {
            multiprocess::reduction::pickle::value_from_slice(data)
        });
        if let Ok(Ok(general)) = general {
            // Equal as Python values (0 == False: a set keeps the first of equal items,
            // as Python does, serde-pickle the last), or identical (NaN != NaN).
            let enc = |v| encode_request(None, "", &[v], &[]);
            // serde-pickle keeps memo references on its stack, so storing a second
            // object under a memo id already in use changes the first one (Python's
            // stack holds the object): the fast decoder, which ignores the memo, is
            // right there. Such inputs (with any memo store) are not compared.
            let stores = data.iter().any(|&c| matches!(c, b'p' | b'q' | b'r' | 0x94));
            assert!(
                fast == general || enc(fast.clone()) == enc(general.clone()) || stores,
                "{} != {}",
                repr_value(&fast),
                repr_value(&general)
            );
        }
    }
});
