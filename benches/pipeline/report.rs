//! The figures table: printed as text, and as markdown for the README and
//! `benches/results.md`.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A figure without a goal of its own.
    Info,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::Info => "-",
        }
    }
}

pub struct Row {
    pub section: String,
    pub figure: String,
    pub measured: String,
    pub reference: String,
    pub ratio: String,
    pub goal: String,
    pub verdict: Verdict,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        section: &str,
        figure: &str,
        measured: impl Into<String>,
        reference: impl Into<String>,
        ratio: impl Into<String>,
        goal: &str,
        verdict: Verdict,
    ) {
        self.rows.push(Row {
            section: section.into(),
            figure: figure.into(),
            measured: measured.into(),
            reference: reference.into(),
            ratio: ratio.into(),
            goal: goal.into(),
            verdict,
        });
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    fn cells(r: &Row) -> [&str; 7] {
        [
            &r.section,
            &r.figure,
            &r.measured,
            &r.reference,
            &r.ratio,
            &r.goal,
            r.verdict.text(),
        ]
    }

    const HEAD: [&'static str; 7] = [
        "section",
        "figure",
        "measured",
        "reference",
        "ratio",
        "goal",
        "goal met",
    ];

    /// A plain-text table with aligned columns.
    pub fn text(&self) -> String {
        let mut w = Self::HEAD.map(|h| h.chars().count());
        for r in &self.rows {
            for (i, c) in Self::cells(r).iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: [&str; 7]| -> String {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = w[i]))
                .collect::<Vec<_>>()
                .join(" | ")
                .trim_end()
                .to_owned()
        };
        let mut out = String::new();
        out += &line(Self::HEAD);
        out += "\n";
        out += &w
            .iter()
            .map(|n| "-".repeat(*n))
            .collect::<Vec<_>>()
            .join("-+-");
        out += "\n";
        let mut last = "";
        for r in &self.rows {
            let mut cells = Self::cells(r);
            if cells[0] == last {
                cells[0] = "";
            } else {
                last = &r.section;
            }
            out += &line(cells);
            out += "\n";
        }
        out
    }

    /// A markdown table (pipes in cells escaped).
    pub fn markdown_table(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = format!("| {} |\n", Self::HEAD.join(" | "));
        out += &format!("|{}\n", "---|".repeat(7));
        for r in &self.rows {
            out += &format!("| {} |\n", Self::cells(r).map(esc).join(" | "));
        }
        out
    }

    pub fn missed(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Missed)
            .collect()
    }
}
