//! The layer rule of the house, kept by a test: every module of `src/` belongs to one layer
//! (its folder says which), and its imports point to its own layer or to a layer below.
//! Within a layer, the units (a file, or a folder taken whole) must not import each other in a
//! circle. Plain Rust over the source text: no build tooling, nothing to install.
//!
//! A failure names the file, the path it imports and both layers, so the fix (move the thing
//! down, or pass it in) is obvious from the message.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up, each with the top-level modules that make it up.
const LAYERS: &[(&str, &[&str])] = &[
    ("leaves", &["base"]),
    ("upstream", &["upstream"]),
    ("model", &["model"]),
    ("data path", &["datapath"]),
    ("control plane", &["control"]),
    ("entry points", &["lib", "main", "demo", "webnode", "load"]),
];

/// Circles that exist today and are being taken apart, each with what it takes. The test fails
/// on any other circle, and on a listed one that is gone (so the list only ever shrinks).
const KNOWN_CIRCLES: &[(&str, &str)] = &[];

/// A module path inside the crate, as segments: `["model", "pool"]`.
type ModPath = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/` with the module path it defines.
fn modules() -> Vec<(PathBuf, ModPath)> {
    let mut out = Vec::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((path.clone(), module_path(&path)));
            }
        }
    }
    out.sort();
    out
}

fn module_path(file: &Path) -> ModPath {
    let relative = file.strip_prefix(src()).expect("under src");
    let mut segments: ModPath = relative
        .iter()
        .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    segments
}

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, tops)| tops.contains(&top))
}

/// The source with comments, string and char literals blanked, so a path in a doc comment or
/// a message does not count as an import.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(text.len(), |n| i + n);
            i = end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(text.len(), |n| i + n + 2);
            i = end;
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].bytes().take_while(|&b| b == b'#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            let end = rest[body..]
                .find(&close)
                .map_or(text.len(), |n| i + body + n + close.len());
            out.push_str("\"\"");
            i = end;
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i = j + 1;
        } else if bytes[i] == b'\'' && is_char_literal(rest) {
            let len = rest[1..].find('\'').map_or(1, |n| n + 2);
            out.push_str("' '");
            i += len;
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `'a'` or `'\n'`, not a lifetime such as `'a`.
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// Every path a file names through `crate::`, `super::` or (in the binary) `fulcrum::`,
/// with `use` groups (`crate::{a::b, c}`) expanded. Paths are resolved to crate-absolute form.
fn imported_paths(code: &str, own: &ModPath, is_mod_rs: bool) -> Vec<ModPath> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "fulcrum::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            // A whole word: not `my_crate::` or `x.super::`.
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let base: ModPath = match start {
                "super::" => {
                    // `super` of `a/b.rs` is `a`; of `a/b/mod.rs` (path `a::b`) also `a`.
                    let mut parent = own.clone();
                    let _ = is_mod_rs;
                    parent.pop();
                    // Chains of `super::super::`.
                    let mut tail = &code[from..];
                    while let Some(rest) = tail.strip_prefix("super::") {
                        parent.pop();
                        from += "super::".len();
                        tail = rest;
                    }
                    parent
                }
                _ => Vec::new(),
            };
            for path in expand(&code[from..]) {
                let mut full = base.clone();
                full.extend(path);
                if !full.is_empty() {
                    found.push(full);
                }
            }
        }
    }
    found
}

/// The paths one `a::b::{c, d::e}` tree spells, stopped at the first item that is not a
/// path (a `;`, a `(`, a space before an identifier...).
fn expand(text: &str) -> Vec<ModPath> {
    if let Some(inner) = text.strip_prefix('{') {
        return split_top_level(group(inner))
            .into_iter()
            .flat_map(|part| expand(part.trim()))
            .collect();
    }
    let mut segment = String::new();
    let mut prefix: ModPath = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' {
            segment.push(c);
        } else if text[i..].starts_with("::") {
            chars.next();
            prefix.push(std::mem::take(&mut segment));
            if text[i + 2..].starts_with('{') {
                let inner = group(&text[i + 3..]);
                let mut out = Vec::new();
                for part in split_top_level(inner) {
                    for tail in expand(part.trim()) {
                        let mut path = prefix.clone();
                        path.extend(tail);
                        out.push(path);
                    }
                }
                if out.is_empty() {
                    out.push(prefix);
                }
                return out;
            }
        } else {
            break;
        }
    }
    if !segment.is_empty() && segment != "self" {
        prefix.push(segment);
    }
    vec![prefix]
}

/// The text inside a `{...}` whose opening brace was just consumed.
fn group(text: &str) -> &str {
    let mut depth = 1;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    text
}

fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// The unit an import lands in for the circle check: the layer's top module and, when it is a
/// folder, the module one below (`model::balance`, `model::pool`); a top-level file is its own.
fn unit(path: &ModPath, known: &BTreeSet<ModPath>) -> Option<ModPath> {
    let top = path.first()?;
    layer_of(top)?;
    let depth = if known.iter().any(|m| m.len() > 1 && &m[0] == top) {
        2
    } else {
        1
    };
    let unit: ModPath = path.iter().take(depth).cloned().collect();
    // `crate::model::Thing` re-exported by the layer's mod.rs: the layer root itself.
    if known.contains(&unit) {
        Some(unit)
    } else {
        Some(path[..1].to_vec())
    }
}

#[test]
fn every_module_lives_in_a_layer() {
    for (file, module) in modules() {
        let top = module.first().map_or("lib", String::as_str);
        assert!(
            layer_of(top).is_some(),
            "{} is in no layer: put it in one of the folders of {LAYERS:?} (tests/layers.rs)",
            file.display()
        );
    }
}

#[test]
fn imports_point_down_the_layers() {
    let mut upward = Vec::new();
    for (file, module) in modules() {
        let top = module.first().map_or("lib", String::as_str);
        let Some(own_layer) = layer_of(top) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        let is_mod_rs = file.ends_with("mod.rs");
        for path in imported_paths(&code_only(&text), &module, is_mod_rs) {
            // `crate::Running`, and the crate-root re-exports (`crate::config`): lib.rs items,
            // the entry layer's, so a module below cannot reach down through them either.
            let layer = layer_of(&path[0]).unwrap_or(LAYERS.len() - 1);
            if layer > own_layer {
                upward.push(format!(
                    "{} ({}) imports crate::{} ({})",
                    file.display(),
                    LAYERS[own_layer].0,
                    path.join("::"),
                    LAYERS[layer].0
                ));
            }
        }
    }
    upward.dedup();
    assert!(
        upward.is_empty(),
        "imports that run up the layers (move the thing down, or pass it in):\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_circle_of_imports_between_units() {
    let all = modules();
    let known: BTreeSet<ModPath> = all.iter().map(|(_, m)| m.clone()).collect();
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (file, module) in &all {
        let Some(from) = unit(module, &known) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for path in imported_paths(&code_only(&text), module, file.ends_with("mod.rs")) {
            if let Some(to) = unit(&path, &known)
                && to != from
                && !to.starts_with(&from)
                && !from.starts_with(&to)
            {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // Depth-first search; a grey node met again closes a circle.
    fn visit(
        node: &ModPath,
        edges: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
        circles: &mut Vec<String>,
    ) {
        state.insert(node.clone(), 1);
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                0 => visit(next, edges, state, stack, circles),
                1 => {
                    let at = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut circle: Vec<String> =
                        stack[at..].iter().map(|m| m.join("::")).collect();
                    circle.push(next.join("::"));
                    circles.push(circle.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.clone(), 2);
    }
    let (mut state, mut circles) = (BTreeMap::new(), Vec::new());
    for node in edges.keys() {
        if !state.contains_key(node) {
            visit(node, &edges, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    // A circle is reported from wherever the search entered it: compare them as sets of units.
    let units =
        |circle: &str| -> BTreeSet<String> { circle.split(" -> ").map(str::to_owned).collect() };
    let known: Vec<BTreeSet<String>> = KNOWN_CIRCLES.iter().map(|(c, _)| units(c)).collect();
    let new: Vec<&String> = circles
        .iter()
        .filter(|c| !known.contains(&units(c)))
        .collect();
    assert!(
        new.is_empty(),
        "import circles (a unit must not reach itself through others):\n{}",
        new.iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (circle, plan) in KNOWN_CIRCLES {
        assert!(
            circles.iter().any(|c| units(c) == units(circle)),
            "the known circle `{circle}` is gone: take it off KNOWN_CIRCLES ({plan})"
        );
    }
}

#[test]
fn the_reader_of_imports_understands_groups_supers_and_comments() {
    let own: ModPath = vec!["model".into(), "balance".into(), "sticky".into()];
    let code = code_only(
        "use crate::{base::config::{A, b::C}, upstream};\n\
         // use crate::control::Nope;\n\
         let s = \"crate::control::Nope\";\n\
         use super::Pick;\n\
         fn f<'a>(x: &'a str) -> char { let _ = crate::base::clock::now_ms(); 'x' }",
    );
    let mut found: Vec<String> = imported_paths(&code, &own, false)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "base::clock::now_ms",
            "base::config::A",
            "base::config::b::C",
            "model::balance::Pick",
            "upstream",
        ]
    );
}
