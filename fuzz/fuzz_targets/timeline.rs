//! The timeline history parser: never a panic; what it accepts has
//! increasing parents and switch points, and reads back the same when
//! written out again.
#![no_main]

use dr::postgres::timeline::parse_history;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entries) = parse_history(text) else {
        return;
    };
    for w in entries.windows(2) {
        assert!(w[0].parent < w[1].parent, "parents must increase");
        assert!(w[0].switch <= w[1].switch, "switch points must not go back");
    }
    let written: String = entries
        .iter()
        .map(|e| format!("{}\t{}\tno recovery target specified\n", e.parent, e.switch))
        .collect();
    let again = parse_history(&written).expect("a written history parses");
    assert_eq!(again, entries, "the history did not read back");
});
