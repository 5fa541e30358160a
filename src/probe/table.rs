//! The table and the JSON of a [`ProbeReport`].

use std::fmt::Write as _;

use super::{ProbeReport, Status};

impl ProbeReport {
    /// Checks with status `Fail`.
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }

    /// An aligned `STATUS | CHECK | DETAIL` table, a `fix:` line under each non-Pass row, and a
    /// verdict line.
    pub fn render_table(&self) -> String {
        let status_w = "STATUS".len();
        let name_w = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain(std::iter::once("CHECK".len()))
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<status_w$} | {:<name_w$} | DETAIL",
            "STATUS", "CHECK"
        );
        let _ = writeln!(
            out,
            "{}-+-{}-+-{}",
            "-".repeat(status_w),
            "-".repeat(name_w),
            "-".repeat(40)
        );
        for c in &self.checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(
                out,
                "{status:<status_w$} | {:<name_w$} | {}",
                c.name, c.detail
            );
            if c.status != Status::Pass {
                let fix = c.fix.as_deref().unwrap_or("(none known)");
                let _ = writeln!(out, "{:<status_w$} | {:<name_w$} | fix: {fix}", "", "");
            }
        }
        let failed = self.failed();
        if failed == 0 {
            out.push_str("postcopy: supported on this host\n");
        } else {
            let _ = writeln!(
                out,
                "postcopy: NOT supported on this host ({failed} failed checks)"
            );
        }
        out
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report of strings and enums always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::super::check;
    use super::*;

    #[test]
    fn table_counts_failures() {
        let report = ProbeReport {
            ok: false,
            checks: vec![
                check("a", Status::Fail, "broken", Some("fix it".into())),
                check("long name", Status::Pass, "fine", None),
            ],
        };
        let t = report.render_table();
        assert!(t.contains("FAIL   | a         | broken\n"), "{t}");
        assert!(t.contains("       |           | fix: fix it\n"), "{t}");
        assert!(
            t.ends_with("postcopy: NOT supported on this host (1 failed checks)\n"),
            "{t}"
        );
    }
}
