//! Arbitrary bytes as a manager request and as a manager reply: the decoders (expansion
//! check, opcode walker, serde-pickle) must return a value or a typed error — never
//! panic, hang or blow up memory. A decoded request must re-encode and decode to the
//! same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprocess::managers::wire::{decode_reply, decode_request, decode_value_fast, encode_request};

fuzz_target!(|data: &[u8]| {
    // The decoders contain serde-pickle's panics (catch_unwind); libfuzzer-sys's hook
    // would abort on those contained panics, so use a quiet one. A panic that escapes a
    // decoder still fails the run (libfuzzer-sys catches it and aborts).
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(req) = decode_request(data) {
        let again = encode_request(req.ident.as_deref(), &req.method, &req.args, &req.kwargs);
        let back = decode_request(&again).expect("our own encoding decodes");
        // NaN floats compare unequal; compare through their debug text.
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
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
            assert!(
                fast == general || format!("{fast:?}") == format!("{general:?}"),
                "{fast:?} != {general:?}"
            );
        }
    }
});
