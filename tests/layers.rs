//! The import graph of `src/` against the layers written at the top of
//! `src/lib.rs`: every `crate::` path (and `dr::` path in the binary) must
//! point to a lower layer or stay inside its own module. And the sizes that
//! keep a file to one idea: at most 800 lines a file, 150 a function.

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

/// `text` without its `#[cfg(test)] mod … { … }` blocks (test modules in
/// files of their own are `tests.rs`, also left out): tests may reach
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

/// Files that hold test modules (`#[cfg(test)] mod name;` in their parent):
/// like `#[cfg(test)] mod … { … }` blocks, they are left out.
fn test_module_files(root: &Path, files: &[PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for path in files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let dir = if path
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
        {
            path.parent().map(Path::to_path_buf)
        } else {
            path.parent().zip(path.file_stem()).map(|(p, s)| p.join(s))
        };
        let Some(dir) = dir else { continue };
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line.trim() != "#[cfg(test)]" {
                continue;
            }
            let Some(next) = lines.peek() else { break };
            if let Some(name) = next
                .trim()
                .strip_prefix("mod ")
                .and_then(|r| r.strip_suffix(';'))
            {
                let file = dir.join(format!("{name}.rs"));
                if let Ok(rel) = file.strip_prefix(root) {
                    out.insert(rel.to_string_lossy().replace('\\', "/"));
                }
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
    let test_files = test_module_files(root, &files);
    let mut bad = Vec::new();
    let mut used_known = BTreeSet::new();
    for path in &files {
        let rel = path
            .strip_prefix(root)
            .expect("under the crate")
            .to_string_lossy()
            .replace('\\', "/");
        // `src/lib.rs` holds the list; `tests.rs` files are test modules.
        if rel == "src/lib.rs" || rel.ends_with("/tests.rs") || test_files.contains(&rel) {
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

/// The module path of a file under `src/`: `postgres/wal.rs` is
/// `postgres::wal`, `postgres/mod.rs` is `postgres`.
fn module_path(rel: &str) -> Vec<String> {
    let trimmed = rel.trim_start_matches("src/").trim_end_matches(".rs");
    let mut parts: Vec<String> = trimmed.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every path that `code` names from `crate::`, `super::` or `self::`, with
/// `use` groups (`a::{b, c::d}`) expanded, as segments relative to the crate
/// root, resolved from the module `here`.
fn named_paths(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        let rest: String = bytes[i..bytes.len().min(i + 8)].iter().collect();
        let root = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|r| rest.starts_with(r));
        let (Some(root), true) = (root, starts_word) else {
            i += 1;
            continue;
        };
        // The rest of the path, braces included, up to where it ends.
        let mut j = i;
        let mut depth = 0;
        while j < bytes.len() {
            let c = bytes[j];
            if c == '{' {
                depth += 1;
            } else if c == '}' {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            } else if depth == 0 && !(c.is_alphanumeric() || c == '_' || c == ':') {
                break;
            }
            j += 1;
        }
        let text: String = bytes[i..j].iter().collect();
        // `super::` names the parent module; `self::` this file's module.
        let base: Vec<String> = match root {
            "crate::" => Vec::new(),
            "super::" => here[..here.len().saturating_sub(1)].to_vec(),
            _ => here.to_vec(),
        };
        for path in expand(&text[root.len()..]) {
            let mut full = base.clone();
            full.extend(
                path.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
            out.push(full);
        }
        i = j.max(i + 1);
    }
    out
}

/// `a::{b, c::{d, e}}` as `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let path: String = path.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = path.find('{') else {
        return vec![path];
    };
    let head = &path[..open];
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (k, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |e| format!("{head}{e}")))
        .collect()
}

/// No two files of `src/` import each other, directly or through others:
/// the graph of `use` lines between files is acyclic. A module's `mod.rs`
/// naming its own children (to declare or re-export them) is not an import.
#[test]
fn files_of_src_import_each_other_without_circles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let test_files = test_module_files(root, &files);
    let rels: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(root)
                .expect("under the crate")
                .to_string_lossy()
                .replace('\\', "/")
        })
        .filter(|r| r != "src/lib.rs" && r != "src/main.rs" && !r.ends_with("/tests.rs"))
        .filter(|r| !test_files.contains(r))
        .collect();
    let modules: BTreeMap<Vec<String>, String> =
        rels.iter().map(|r| (module_path(r), r.clone())).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rel in &rels {
        let here = module_path(rel);
        let text = std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let code = without_test_modules(&text);
        for path in named_paths(&code, &here) {
            // The longest prefix of the path that is a file of its own.
            let target = (1..=path.len())
                .rev()
                .find_map(|n| modules.get(&path[..n]).map(|t| (n, t)));
            let Some((n, target)) = target else { continue };
            let parent_names_child = path[..n].starts_with(&here) && path.len() > here.len();
            if target != rel && !parent_names_child {
                edges.entry(rel.clone()).or_default().insert(target.clone());
            }
        }
    }
    // Depth-first search for a back edge; report the circle it closes.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        found: &mut Vec<String>,
    ) {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                0 => visit(next, edges, state, stack, found),
                1 => {
                    let from = stack.iter().position(|s| s == next).unwrap_or(0);
                    found.push(format!("{} -> {next}", stack[from..].join(" -> ")));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
    }
    let (mut state, mut stack, mut found) = (BTreeMap::new(), Vec::new(), Vec::new());
    for rel in &rels {
        if !state.contains_key(rel.as_str()) {
            visit(rel, &edges, &mut state, &mut stack, &mut found);
        }
    }
    assert!(edges.len() > 50, "too few imports read: {}", edges.len());
    assert!(
        found.is_empty(),
        "import circles between files of src/:\n{}",
        found.join("\n")
    );
}

#[test]
fn use_groups_expand_and_relative_roots_resolve() {
    assert_eq!(expand("a::{b, c::{d, e}}"), ["a::b", "a::c::d", "a::c::e"]);
    let here: Vec<String> = vec!["postgres".into(), "stream".into()];
    let got = named_paths(
        "use super::{wal::X, Lsn};\nfn f() { crate::repo::g() }",
        &here,
    );
    let got: Vec<String> = got.iter().map(|p| p.join("::")).collect();
    assert_eq!(got, ["postgres::wal::X", "postgres::Lsn", "repo::g"]);
}

/// Functions of `text` (as rustfmt lays them out) longer than `max` lines,
/// as `name (lines)`.
fn long_functions(text: &str, max: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let head = ["pub ", "pub(crate) ", "pub(super) ", "async ", "const "]
            .iter()
            .fold(body, |b, p| b.strip_prefix(p).unwrap_or(b));
        let head = head.strip_prefix("async ").unwrap_or(head);
        let Some(rest) = head.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        let Some(len) = lines[i + 1..].iter().position(|l| l.trim_end() == close) else {
            continue;
        };
        if len + 2 > max {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(format!("{name} ({} lines)", len + 2));
        }
    }
    out
}

#[test]
fn files_and_functions_stay_small_enough_to_hold_one_idea() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut too_big = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        let rel = f
            .strip_prefix(&root)
            .expect("under src")
            .display()
            .to_string();
        let n = text.lines().count();
        if n > 800 {
            too_big.push(format!(
                "{rel}: {n} lines (at most 800: split it along its ideas)"
            ));
        }
        for fun in long_functions(&text, 150) {
            too_big.push(format!("{rel}: fn {fun} (at most 150)"));
        }
    }
    assert!(too_big.is_empty(), "{}", too_big.join("\n"));
}

#[test]
fn long_functions_are_found_at_any_indent() {
    let body = "    x();\n".repeat(149);
    let text = format!(
        "fn short() {{\n    x();\n}}\n\nimpl A {{\n    pub async fn long(&self) {{\n{}    }}\n}}\n",
        body.replace("\n    ", "\n        ")
            .replacen("    x", "        x", 1)
    );
    assert_eq!(long_functions(&text, 150), ["long (151 lines)"]);
    assert!(long_functions(&text, 151).is_empty());
}
