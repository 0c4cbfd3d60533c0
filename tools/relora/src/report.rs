//! What `relora train` prints while it trains: a progress bar on a terminal; without one
//! (output redirected to a file, nohup, CI, a job scheduler) one plain line per log interval
//! and per event, so that a log shows the loss; with `--quiet` only the evaluations.

use indicatif::{ProgressBar, ProgressStyle};
use relora::run::StepReport;
use std::io::IsTerminal;

/// How progress is shown.
enum Style {
    /// A progress bar on the terminal; events print above it.
    Bar(ProgressBar),
    /// Plain lines: one every `every` steps and one per event.
    Lines { every: u64, total: u64 },
    /// Evaluations only.
    Quiet,
}

/// Prints a run's progress and events.
pub struct Reporter {
    style: Style,
}

impl Reporter {
    /// A reporter for a run of `total` steps now at `step`: quiet when asked (or on a
    /// data-parallel rank other than 0), a bar when stderr is a terminal, else plain lines
    /// every `log_every` steps.
    pub fn new(quiet: bool, total: u64, step: u64, log_every: u64) -> Reporter {
        let style = if quiet {
            Style::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(step);
            Style::Bar(bar)
        } else {
            Style::Lines {
                every: log_every.max(1),
                total,
            }
        };
        Reporter { style }
    }

    /// Prints a line that is not tied to the step counter (the bar stays below it).
    pub fn event(&self, line: &str) {
        match &self.style {
            Style::Bar(bar) => bar.println(line),
            Style::Lines { .. } => eprintln!("{line}"),
            Style::Quiet => {}
        }
    }

    /// Reports one step: the bar or the interval line, and the step's events.
    pub fn step(&self, r: &StepReport<'_>) {
        let s = r.stats;
        let phase = if !s.adapters {
            "full".to_string()
        } else {
            format!("adapters/phase {}", s.phase)
        };
        let status = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s {phase}{}",
            s.loss,
            s.lr,
            r.tokens_per_s,
            if s.skipped { " SKIPPED" } else { "" }
        );
        match &self.style {
            Style::Bar(bar) => {
                bar.set_position(s.step);
                bar.set_message(status);
            }
            Style::Lines { every, total } => {
                // The step a line names is the number of steps completed.
                if s.step.is_multiple_of(*every) || s.step == *total {
                    eprintln!("step {}/{total}: {status}", s.step);
                }
            }
            Style::Quiet => {}
        }
        if s.switched {
            self.event(&format!("step {}: switched to low-rank adapters", s.step));
        }
        if let Some(rs) = s.reset {
            self.event(&format!(
                "step {}: merged phase {}; optimizer reset zeroed {} of {} adapter state entries",
                s.step, rs.phase, rs.zeroed, rs.positions
            ));
        }
        if s.skipped {
            self.event(&format!(
                "step {}: skipped (non-finite loss or gradient; {} skipped so far)",
                s.step, s.skipped_total
            ));
        }
        if let Some(e) = r.eval {
            let line = format!(
                "step {}: train loss {:.4}, eval loss {:.4}, perplexity {:.2}",
                s.step, s.loss, e.loss, e.perplexity
            );
            match &self.style {
                Style::Quiet => eprintln!("{line}"),
                _ => self.event(&line),
            }
        }
    }

    /// Ends the progress display so that what follows starts on a line of its own.
    pub fn finish(&self) {
        if let Style::Bar(bar) = &self.style {
            bar.finish_and_clear();
        }
    }

    /// Leaves the bar as it stands (training failed).
    pub fn abandon(&self) {
        if let Style::Bar(bar) = &self.style {
            bar.abandon();
        }
    }
}
