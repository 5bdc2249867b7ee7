//! The layer map of ARCHITECTURE §3, checked against the code: every `crate::` and
//! `super::` path in `src/` that leaves its top-level module is an edge of the module
//! graph, and no edge may go up the map, and the graph may have no cycle.
//!
//! Comments and string literals are ignored (doc links name modules freely); a name
//! re-exported at the crate root (`crate::Error`) counts as an edge to the module that
//! `lib.rs` re-exports it from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// ARCHITECTURE §3: each top-level module and its layer (dependencies flow downward).
const LAYERS: &[(&str, u32)] = &[
    ("sys", 0),
    ("error", 1),
    ("context", 1),
    ("reduction", 1),
    ("connection", 2),
    ("spawn", 3),
    ("popen", 3),
    ("process", 3),
    ("shared_memory", 4),
    ("synchronize", 4),
    ("sharedctypes", 4),
    ("queues", 5),
    ("pool", 6),
    ("managers", 6),
    ("bootstrap", 7),
];

/// Known exceptions to the map, each with its reason (none today: keep it that way).
const ALLOWED_UNTIL_MERGE: &[(&str, &str)] = &[];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The text with comments and string/char literals blanked out.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'r' && b[i..].starts_with(b"r#\"") {
            let end = text[i + 3..].find("\"#").map_or(b.len(), |e| i + 3 + e + 2);
            i = end;
            out.push_str("\"\"");
        } else {
            let ch = text[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first identifier of each path that follows `prefix` (`crate::a`, `crate::{a, b::c}`).
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<(usize, &'a str)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(prefix) {
        let start = from + at;
        from = start + prefix.len();
        if start > 0 && code[..start].ends_with(|c: char| is_ident(c)) {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && depth == 1 && is_ident(c) => {
                        let end = group[k..].find(|c: char| !is_ident(c)).unwrap_or(0);
                        found.push((start, &group[k..k + end]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
            found.push((start, &rest[..end]));
        }
    }
    found
}

/// Names re-exported at the crate root, by the top-level module they come from.
fn root_names(lib: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for stmt in code_only(lib).split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = path.split("::").next().unwrap_or("").trim();
        if !modules.contains(module) {
            continue;
        }
        let tail = path.rsplit_once("::").map_or("", |(_, t)| t);
        let list = match (path.find('{'), path.rfind('}')) {
            (Some(a), Some(b)) => &path[a + 1..b],
            _ => tail,
        };
        for name in list.split(',') {
            let name = name.split_whitespace().last().unwrap_or("");
            let name = name.rsplit("::").next().unwrap_or(name);
            if !name.is_empty() {
                names.insert(name.to_string(), module.to_string());
            }
        }
    }
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Edges of the top-level module graph: `(from, to) → files that make the edge`.
type Edges = BTreeMap<(String, String), BTreeSet<String>>;

/// The top-level modules and the graph between them.
fn graph(src: &Path) -> (BTreeSet<String>, Edges) {
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(src).expect("read src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name != "lib" {
            modules.insert(name);
        }
    }
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let names = root_names(&lib, &modules);
    let resolve = |name: &str| -> Option<String> {
        if modules.contains(name) {
            Some(name.to_string())
        } else {
            names.get(name).cloned()
        }
    };
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges = Edges::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts == ["lib"] {
            continue;
        }
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        let top = parts[0].clone();
        let code = code_only(&std::fs::read_to_string(&file).expect("read"));
        let mut targets = Vec::new();
        for (_, name) in paths_after(&code, "crate::") {
            targets.extend(resolve(name));
        }
        // `super::super::x` from `a/b.rs` (module a::b) is `x` at the root: an edge.
        for (at, name) in paths_after(&code, "super::") {
            if code[..at].ends_with("super::") {
                continue; // counted from the first `super::` of the chain
            }
            let mut ups = 1;
            let mut rest = &code[at + "super::".len()..];
            let mut name = name;
            while let Some(r) = rest.strip_prefix("super::") {
                ups += 1;
                rest = r;
                name = &r[..r.find(|c: char| !is_ident(c)).unwrap_or(r.len())];
            }
            if ups >= parts.len() {
                targets.extend(resolve(name));
            }
        }
        for t in targets {
            if t != top {
                edges
                    .entry((top.clone(), t))
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    (modules, edges)
}

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// A cycle through the graph, if there is one (as a path that returns to its start).
fn find_cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeSet<(String, String)>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for (_, next) in edges.iter().filter(|(a, _)| a == node) {
            match state.get(next).copied() {
                Some(1) => {
                    let from = stack.iter().position(|s| s == next).expect("on stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    let nodes: BTreeSet<&String> = edges.iter().map(|(a, _)| a).collect();
    for n in nodes {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn every_top_level_module_has_a_layer() {
    let (modules, _) = graph(&src());
    let missing: Vec<&String> = modules.iter().filter(|m| layer(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "modules missing from the layer map (ARCHITECTURE §3 and LAYERS here): {missing:?}"
    );
}

#[test]
fn no_edge_goes_up_the_layer_map() {
    let (_, edges) = graph(&src());
    let up: Vec<String> = edges
        .iter()
        .filter(|((a, b), _)| layer(b) > layer(a))
        .filter(|((a, b), _)| !ALLOWED_UNTIL_MERGE.contains(&(a.as_str(), b.as_str())))
        .map(|((a, b), files)| {
            format!(
                "{a} (L{:?}) -> {b} (L{:?}) in {files:?}",
                layer(a),
                layer(b)
            )
        })
        .collect();
    assert!(up.is_empty(), "edges up the layer map:\n{}", up.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let (_, edges) = graph(&src());
    let edges: BTreeSet<(String, String)> = edges
        .into_keys()
        .filter(|(a, b)| !ALLOWED_UNTIL_MERGE.contains(&(a.as_str(), b.as_str())))
        .collect();
    if let Some(cycle) = find_cycle(&edges) {
        panic!("a cycle between top-level modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_checker_sees_edges_and_cycles() {
    // The scanner itself: grouped imports, root re-exports, `super::` to the root, and
    // paths in comments and strings ignored.
    let code =
        code_only("use crate::{a::X, b}; // crate::c\nlet s = \"crate::d\"; super::super::e::f();");
    let names: Vec<&str> = paths_after(&code, "crate::")
        .into_iter()
        .map(|p| p.1)
        .collect();
    assert_eq!(names, ["a", "b"]);
    let lib = "pub use error::{Error, Result};\npub use pool::mpi;";
    let modules: BTreeSet<String> = ["error", "pool"].map(String::from).into();
    let roots = root_names(lib, &modules);
    assert_eq!(roots.get("Result").map(String::as_str), Some("error"));
    assert_eq!(roots.get("mpi").map(String::as_str), Some("pool"));
    let edge = |a: &str, b: &str| (a.to_string(), b.to_string());
    let cyclic: BTreeSet<_> = [edge("x", "y"), edge("y", "z"), edge("z", "x")].into();
    assert!(find_cycle(&cyclic).is_some());
    let acyclic: BTreeSet<_> = [edge("x", "y"), edge("y", "z"), edge("x", "z")].into();
    assert!(find_cycle(&acyclic).is_none());
}
