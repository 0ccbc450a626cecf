//! The shape of the code, checked: one behaviour in one place needs files, functions
//! and handlers small enough to read, crates that depend only downwards, and modules
//! that do not import each other in a circle.
//!
//! Limits, on non-test sources (a crate's `src/`, without `#[cfg(test)]` items, files
//! named `tests.rs`, and the `tests` crate, which is all test support):
//! - a file at most [`MAX_FILE_LINES`] lines;
//! - a function at most [`MAX_FN_LINES`] lines, from `fn` to its closing brace;
//! - a gRPC handler (a method of an `impl …_server::Service for …`) at most
//!   [`MAX_HANDLER_LINES`] lines: it parses, calls one domain function, maps the error;
//! - each crate depends only on the workspace crates [`ALLOWED_DEPS`] gives it;
//! - within a crate, the top-level modules' `crate::…` references form no cycle.
//!
//! The test prints every offender with its place, so a failure says what to split.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use syn::spanned::Spanned;
use syn::visit::Visit;

const MAX_FILE_LINES: usize = 1200;
const MAX_FN_LINES: usize = 120;
const MAX_HANDLER_LINES: usize = 25;

/// The workspace crates each crate may depend on (normal and build dependencies).
/// A crate missing here is an offence: a new crate says where it sits.
const ALLOWED_DEPS: &[(&str, &[&str])] = &[
    ("bulwark-proto", &[]),
    ("bulwark-common", &["bulwark-proto"]),
    ("bulwark-nbd", &["bulwark-proto", "bulwark-common"]),
    (
        "bulwark-node",
        &["bulwark-proto", "bulwark-common", "bulwark-nbd"],
    ),
    (
        "bulwark-agent",
        &["bulwark-proto", "bulwark-common", "bulwark-nbd"],
    ),
    ("bulwark-coordinator", &["bulwark-proto", "bulwark-common"]),
    (
        "bulwark-cli",
        &[
            "bulwark-proto",
            "bulwark-common",
            "bulwark-nbd",
            "bulwark-node",
            "bulwark-agent",
            "bulwark-coordinator",
        ],
    ),
    (
        "bulwark-tests",
        &[
            "bulwark-proto",
            "bulwark-common",
            "bulwark-nbd",
            "bulwark-node",
            "bulwark-agent",
            "bulwark-coordinator",
            "bulwark-cli",
        ],
    ),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The workspace's member directories, from the root Cargo.toml.
fn members(root: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string(root.join("Cargo.toml")).expect("read the root Cargo.toml");
    let doc: toml::Table = text.parse().expect("the root Cargo.toml parses");
    doc["workspace"]["members"]
        .as_array()
        .expect("workspace.members is a list")
        .iter()
        .map(|m| root.join(m.as_str().expect("a member is a path")))
        .collect()
}

struct Crate {
    name: String,
    dir: PathBuf,
    deps: BTreeSet<String>,
}

fn read_crate(dir: &Path) -> Crate {
    let path = dir.join("Cargo.toml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = doc["package"]["name"]
        .as_str()
        .expect("package.name")
        .to_string();
    let deps = ["dependencies", "build-dependencies"]
        .iter()
        .filter_map(|t| doc.get(*t).and_then(|d| d.as_table()))
        .flat_map(|t| t.keys().cloned())
        .filter(|d| d.starts_with("bulwark-"))
        .collect();
    Crate {
        name,
        dir: dir.to_path_buf(),
        deps,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

fn is_test_attr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        if path.is_ident("cfg") {
            let syn::Meta::List(list) = &a.meta else {
                return false;
            };
            let text = list.tokens.to_string();
            return text.contains("test") && !text.contains("not");
        }
        // #[test], #[tokio::test] and the like.
        path.segments.last().is_some_and(|s| s.ident == "test")
    })
}

fn lines_of(span: proc_macro2::Span) -> (usize, usize) {
    (span.start().line, span.end().line)
}

/// Walks one file: long functions, long handlers, test lines, and `crate::` references.
struct Walker<'a> {
    file: &'a str,
    in_handler_impl: bool,
    test_lines: usize,
    long_fns: Vec<String>,
    long_handlers: Vec<String>,
    refs: BTreeSet<String>,
}

impl Walker<'_> {
    fn check_fn(&mut self, name: &syn::Ident, start: proc_macro2::Span, body: &syn::Block) {
        let (first, _) = lines_of(start);
        let (_, last) = lines_of(body.brace_token.span.close());
        let n = last + 1 - first;
        if self.in_handler_impl && n > MAX_HANDLER_LINES {
            self.long_handlers.push(format!(
                "{}:{first}: handler `{name}` is {n} lines (at most {MAX_HANDLER_LINES})",
                self.file
            ));
        } else if n > MAX_FN_LINES {
            self.long_fns.push(format!(
                "{}:{first}: fn `{name}` is {n} lines (at most {MAX_FN_LINES})",
                self.file
            ));
        }
    }

    fn skip_test(&mut self, attrs: &[syn::Attribute], span: proc_macro2::Span) -> bool {
        if is_test_attr(attrs) {
            let (a, b) = lines_of(span);
            self.test_lines += b + 1 - a;
            return true;
        }
        false
    }
}

impl<'ast> Visit<'ast> for Walker<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            _ => &[],
        };
        if self.skip_test(attrs, item.span()) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.check_fn(&f.sig.ident, f.sig.fn_token.span, &f.block);
        let outer = std::mem::replace(&mut self.in_handler_impl, false);
        syn::visit::visit_item_fn(self, f);
        self.in_handler_impl = outer;
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let handler = i.trait_.as_ref().is_some_and(|(_, path, _)| {
            path.segments
                .iter()
                .any(|s| s.ident.to_string().ends_with("_server"))
        });
        let outer = std::mem::replace(&mut self.in_handler_impl, handler);
        syn::visit::visit_item_impl(self, i);
        self.in_handler_impl = outer;
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if self.skip_test(&f.attrs, f.span()) {
            return;
        }
        self.check_fn(&f.sig.ident, f.sig.fn_token.span, &f.block);
        let outer = std::mem::replace(&mut self.in_handler_impl, false);
        syn::visit::visit_impl_item_fn(self, f);
        self.in_handler_impl = outer;
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(body) = &f.default {
            self.check_fn(&f.sig.ident, f.sig.fn_token.span, body);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let mut segs = p.segments.iter();
        if segs.next().is_some_and(|s| s.ident == "crate")
            && let Some(m) = segs.next()
        {
            self.refs.insert(m.ident.to_string());
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_use_tree(&mut self, t: &'ast syn::UseTree) {
        if let syn::UseTree::Path(p) = t
            && p.ident == "crate"
        {
            collect_use_heads(&p.tree, &mut self.refs);
        }
        syn::visit::visit_use_tree(self, t);
    }
}

fn collect_use_heads(t: &syn::UseTree, out: &mut BTreeSet<String>) {
    match t {
        syn::UseTree::Path(p) => {
            out.insert(p.ident.to_string());
        }
        syn::UseTree::Name(n) => {
            out.insert(n.ident.to_string());
        }
        syn::UseTree::Rename(r) => {
            out.insert(r.ident.to_string());
        }
        syn::UseTree::Group(g) => g.items.iter().for_each(|i| collect_use_heads(i, out)),
        syn::UseTree::Glob(_) => {}
    }
}

/// The top-level module a file of `src` belongs to (`src/a/b.rs` and `src/a.rs` → `a`),
/// or None for the crate root and binaries.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    match name {
        "lib" | "main" | "bin" => None,
        _ => Some(name.to_string()),
    }
}

/// Every cycle among `edges` found by a depth-first search, each once.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn dfs(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        if let Some(pos) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[pos..].to_vec();
            let min = (0..cycle.len())
                .min_by_key(|&i| cycle[i].clone())
                .unwrap_or(0);
            cycle.rotate_left(min);
            found.insert(cycle);
            return;
        }
        if done.contains(node) {
            return;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            dfs(next, edges, stack, done, found);
        }
        stack.pop();
        done.insert(node.to_string());
    }
    let mut found = BTreeSet::new();
    for node in edges.keys() {
        dfs(
            node,
            edges,
            &mut Vec::new(),
            &mut BTreeSet::new(),
            &mut found,
        );
    }
    found.into_iter().collect()
}

#[test]
fn files_functions_handlers_crates_and_modules_stay_within_their_limits() {
    let root = workspace_root();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED_DEPS.iter().copied().collect();
    let mut offences = Vec::new();
    let mut files_read = 0;
    for dir in members(&root) {
        let krate = read_crate(&dir);
        match allowed.get(krate.name.as_str()) {
            None => offences.push(format!(
                "crate {} is not in ALLOWED_DEPS of tests/tests/structure.rs: say which crates it may depend on",
                krate.name
            )),
            Some(ok) => {
                for dep in &krate.deps {
                    if !ok.contains(&dep.as_str()) {
                        offences.push(format!(
                            "{}/Cargo.toml: crate {} must not depend on {dep}",
                            krate.dir.display(),
                            krate.name
                        ));
                    }
                }
            }
        }
        if krate.name == "bulwark-tests" {
            continue;
        }
        let src = krate.dir.join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            files_read += 1;
            let text =
                fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let shown = file
                .strip_prefix(&root)
                .unwrap_or(&file)
                .display()
                .to_string();
            let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{shown}: {e}"));
            let mut w = Walker {
                file: &shown,
                in_handler_impl: false,
                test_lines: 0,
                long_fns: Vec::new(),
                long_handlers: Vec::new(),
                refs: BTreeSet::new(),
            };
            w.visit_file(&ast);
            let lines = text.lines().count().saturating_sub(w.test_lines);
            if lines > MAX_FILE_LINES {
                offences.push(format!(
                    "{shown}: {lines} lines outside tests (at most {MAX_FILE_LINES})"
                ));
            }
            offences.append(&mut w.long_fns);
            offences.append(&mut w.long_handlers);
            if let Some(top) = top_module(&src, &file) {
                let out = edges.entry(top.clone()).or_default();
                out.extend(w.refs.into_iter().filter(|r| *r != top));
            }
        }
        let modules: BTreeSet<String> = edges.keys().cloned().collect();
        for targets in edges.values_mut() {
            targets.retain(|t| modules.contains(t));
        }
        for cycle in cycles(&edges) {
            offences.push(format!(
                "{}: modules import each other in a cycle: {} -> {}",
                krate.name,
                cycle.join(" -> "),
                cycle[0]
            ));
        }
    }
    assert!(files_read > 50, "read only {files_read} source files");
    assert!(
        offences.is_empty(),
        "{} structure offences:\n{}",
        offences.len(),
        offences.join("\n")
    );
}
