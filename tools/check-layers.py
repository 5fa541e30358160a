#!/usr/bin/env python3
"""Checks the library's layering rules on src/ (run from the repository root).

- nothing under source/ imports dest/, nor the reverse;
- link/, codec, sys/ import neither side;
- no library module imports a CLI module (demo, bench, baseline, workload, report, cli);
- no import cycle between files.
Prints each violation; exits 1 if there is any.
"""
import os
import re
import sys

SRC = "src"
CLI = {"demo", "bench", "baseline", "workload", "report", "cli", "main"}


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel


def files():
    for root, _, names in os.walk(SRC):
        for n in names:
            if n.endswith(".rs"):
                yield os.path.join(root, n)


def strip_tests(text):
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


def imports(path, mods):
    """The files `path` imports (by `crate::`, `super::`, or `postcopy::` paths)."""
    me = module_of(path)
    text = re.sub(r"//.*", "", strip_tests(open(path).read()))
    out = set()
    for m in re.finditer(r"\b(crate|super|postcopy)((?:::\w+)+)", text):
        head, parts = m.group(1), m.group(2).split("::")[1:]
        if head == "super":
            base = me[:-1] if not path.endswith("mod.rs") else me[:-1]
            if path.endswith("mod.rs"):
                base = me[:-1]
            else:
                base = me[:-1]
            target = base + parts
        else:
            target = parts
        # the longest prefix that is a module file
        while target and tuple(target) not in mods:
            target = target[:-1]
        if target and tuple(target) != tuple(me):
            out.add(tuple(target))
    return out


def main():
    paths = list(files())
    mods = {tuple(module_of(p)): p for p in paths}
    graph = {tuple(module_of(p)): imports(p, mods) for p in paths}
    bad = []
    for m, deps in graph.items():
        top = m[0] if m else ""
        for d in deps:
            dtop = d[0] if d else ""
            if top == "source" and dtop == "dest" or top == "dest" and dtop == "source":
                bad.append(f"{'/'.join(m)} imports {'/'.join(d)} (source and dest are separate)")
            if top in ("link", "codec", "sys") and dtop in ("source", "dest"):
                bad.append(f"{'/'.join(m)} imports {'/'.join(d)} (a lower layer imports a side)")
            if top not in CLI and dtop in CLI:
                bad.append(f"{'/'.join(m)} imports the CLI module {'/'.join(d)}")
    # cycles: a module re-exporting its children (`pub use child::X` in a mod.rs) is its API,
    # not a dependency, so a parent's edges to its own children are left out.
    def edges(m):
        return {d for d in graph[m] if not (len(d) == len(m) + 1 and d[: len(m)] == m)}
    state = {}
    stack = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in edges(m):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                bad.append("import cycle: " + " -> ".join("/".join(x) or "lib" for x in cyc))
            elif d in graph and d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    for b in sorted(set(bad)):
        print(b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
