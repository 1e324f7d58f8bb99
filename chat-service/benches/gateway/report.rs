//! The benchmark's report: one row per figure (baseline, through the service, what the service
//! adds, target and verdict), printed as a table, plus the JSON written to `target/bench`.

use serde_json::Value;

pub struct Row {
    pub metric: String,
    pub baseline: String,
    pub service: String,
    pub added: String,
    pub target: String,
    pub verdict: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub json: serde_json::Map<String, Value>,
}

impl Report {
    pub fn row(&mut self, metric: &str, baseline: String, service: String, added: String) {
        self.rows.push(Row {
            metric: metric.into(),
            baseline,
            service,
            added,
            target: "-".into(),
            verdict: "-".into(),
        });
    }

    pub fn judged(
        &mut self,
        metric: &str,
        baseline: String,
        service: String,
        added: String,
        target: &str,
        met: bool,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            baseline,
            service,
            added,
            target: target.into(),
            verdict: if met { "met" } else { "MISSED" }.into(),
        });
    }

    pub fn table(&self) -> String {
        let header = [
            "metric",
            "baseline",
            "chat-service",
            "added / ratio",
            "target",
            "verdict",
        ];
        let cells: Vec<[&str; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.metric.as_str(),
                    &r.baseline,
                    &r.service,
                    &r.added,
                    &r.target,
                    &r.verdict,
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..6)
            .map(|i| {
                cells
                    .iter()
                    .map(|c| c[i].chars().count())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |c: &[&str]| {
            let cols: Vec<String> = c
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect();
            format!("| {} |\n", cols.join(" | "))
        };
        let mut out = line(&header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        for c in &cells {
            out.push_str(&line(c));
        }
        out
    }
}

pub fn f1(v: f64) -> String {
    format!("{v:.1}")
}

pub fn f2(v: f64) -> String {
    format!("{v:.2}")
}

pub fn signed(v: f64) -> String {
    format!("{v:+.2}")
}
