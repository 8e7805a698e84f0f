//! The import graph of `src/` against the layers written at the top of
//! `src/lib.rs`: every `crate::` path (and `dr::` path in the binary) must
//! point to a lower layer or stay inside its own module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Upward or sideways imports that predate the layer list (issue 16). Each
/// is (file, module it imports); remove an entry when its import is gone:
/// the test fails on stale entries too, so this list only shrinks.
const KNOWN: &[(&str, &str)] = &[];

/// Layer number of each top-level module, from the numbered list in the
/// doc comment of `src/lib.rs` (`//! N. \`a\`, \`b\`: what they are`).
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(item) = line.strip_prefix("//! ") else {
            continue;
        };
        let Some((num, rest)) = item.split_once(". ") else {
            continue;
        };
        let Ok(layer) = num.parse::<usize>() else {
            continue;
        };
        let names = rest.split(": ").next().unwrap_or(rest);
        for name in names.split(',') {
            let name = name.trim().trim_matches('`');
            assert!(
                out.insert(name.to_string(), layer).is_none(),
                "src/lib.rs lists `{name}` in two layers"
            );
        }
    }
    assert!(
        out.len() > 10,
        "no layer list found at the top of src/lib.rs"
    );
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without its `#[cfg(test)] mod … { … }` blocks: tests may reach
/// up to build their fixtures (e.g. `config`'s tests load through
/// `validate`), the layers are about what the product code uses.
fn without_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let opens_test_mod = line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod ") && next.ends_with('{'));
        if !opens_test_mod {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        // Skip to the brace that closes the module; the `mod` line opens it.
        let mut depth = 0i64;
        for inner in lines.by_ref() {
            depth += inner.matches('{').count() as i64 - inner.matches('}').count() as i64;
            if depth <= 0 {
                break;
            }
        }
    }
    out
}

/// The top-level modules that `text` names after `prefix` (`crate::` or
/// `dr::`), comments left out.
fn imports(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            let after = &rest[i + prefix.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn imports_point_down_the_layers_of_lib_rs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("src/lib.rs");
    let layer = layers(&lib);
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut used_known = BTreeSet::new();
    for path in &files {
        let rel = path
            .strip_prefix(root)
            .expect("under the crate")
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "src/lib.rs" {
            continue;
        }
        let module = rel
            .trim_start_matches("src/")
            .split('/')
            .next()
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_string();
        let Some(&own) = layer.get(&module) else {
            bad.push(format!(
                "{rel}: module `{module}` is in no layer; add it to the list in src/lib.rs"
            ));
            continue;
        };
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let code = without_test_modules(&text);
        let mut named = imports(&code, "crate::");
        // The binary (`main`, `cli`) reaches the library as `dr::`.
        if module == "main" || module == "cli" {
            named.extend(imports(&code, "dr::"));
        }
        for target in named.into_iter().filter(|t| *t != module) {
            let Some(&to) = layer.get(&target) else {
                // `crate::` in the binary names its own modules, e.g. `cli`.
                continue;
            };
            if to < own {
                continue;
            }
            if KNOWN.contains(&(rel.as_str(), target.as_str())) {
                used_known.insert((rel.clone(), target));
                continue;
            }
            let how = if to == own { "beside it" } else { "above it" };
            bad.push(format!(
                "{rel}: imports `crate::{target}` (layer {to}), {how} `{module}` (layer {own})"
            ));
        }
    }
    for (file, target) in KNOWN {
        if !used_known.contains(&(file.to_string(), target.to_string())) {
            bad.push(format!(
                "{file}: no longer imports `{target}`; remove it from KNOWN in tests/layers.rs"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layers of src/lib.rs:\n{}",
        bad.join("\n")
    );
}

#[test]
fn test_modules_are_left_out_and_comments_ignored() {
    let text = "use crate::a::X;\n// crate::b\nfn f() { crate::c::g(); }\n\
                #[cfg(test)]\nmod tests {\n    fn t() { crate::d::h(); }\n}\n\
                fn after() { my_crate::e(); crate::f::k() }\n";
    let found = imports(&without_test_modules(text), "crate::");
    let names: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(names, ["a", "c", "f"]);
}
