//! The per-region breakdown of a profiled `relora bench --profile` run: where a step's time goes.

use relora::profile::RegionTime;
use serde::{Deserialize, Serialize};

/// One region's share of a profiled step.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegionPerStep {
    /// The region's name (see `relora::profile`).
    pub region: String,
    /// Milliseconds per step spent in the region, not counting regions nested inside it.
    pub ms: f64,
    /// Times the region ran per step (per layer regions: once or twice a layer).
    pub calls: f64,
}

/// A mode's profiled steps.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StepProfile {
    /// Mean wall milliseconds of a profiled step (slower than an unprofiled one: every region
    /// waits for the device).
    pub mean_step_ms: f64,
    /// The regions in the order the step first ran them.
    pub regions: Vec<RegionPerStep>,
}

impl StepProfile {
    /// The profile of `steps` timed steps whose wall times are `step_ms`, from their regions.
    pub fn new(regions: Vec<RegionTime>, step_ms: &[f64]) -> Self {
        let steps = step_ms.len().max(1) as f64;
        StepProfile {
            mean_step_ms: step_ms.iter().sum::<f64>() / steps,
            regions: regions
                .into_iter()
                .map(|r| RegionPerStep {
                    region: r.name.to_string(),
                    ms: r.total_ms / steps,
                    calls: r.calls as f64 / steps,
                })
                .collect(),
        }
    }

    /// Step time outside every region (host work between regions, the batch upload).
    fn unaccounted_ms(&self) -> f64 {
        self.mean_step_ms - self.regions.iter().map(|r| r.ms).sum::<f64>()
    }
}

/// Prints one table of every region, a column pair (ms per step, share of the step) per mode.
pub fn print_table(modes: &[(&str, &StepProfile)]) {
    let mut names: Vec<&str> = Vec::new();
    for (_, p) in modes {
        for r in &p.regions {
            if !names.contains(&r.region.as_str()) {
                names.push(&r.region);
            }
        }
    }
    println!();
    println!(
        "where a profiled step goes (ms per step, share of the step; waits around every region)"
    );
    print!("{:<36}", "region");
    for (mode, _) in modes {
        print!(" {:>10} {:>6}", format!("{mode} ms"), "%");
    }
    println!();
    let row = |label: &str, values: Vec<Option<(f64, f64)>>| {
        print!("{label:<36}");
        for v in values {
            match v {
                Some((ms, of)) => print!(" {ms:>10.2} {:>5.1}%", 100.0 * ms / of),
                None => print!(" {:>10} {:>6}", "-", ""),
            }
        }
        println!();
    };
    for name in names {
        row(
            name,
            modes
                .iter()
                .map(|(_, p)| {
                    p.regions
                        .iter()
                        .find(|r| r.region == name)
                        .map(|r| (r.ms, p.mean_step_ms))
                })
                .collect(),
        );
    }
    row(
        "(outside every region)",
        modes
            .iter()
            .map(|(_, p)| Some((p.unaccounted_ms(), p.mean_step_ms)))
            .collect(),
    );
    row(
        "step (profiled)",
        modes
            .iter()
            .map(|(_, p)| Some((p.mean_step_ms, p.mean_step_ms)))
            .collect(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_step_values_and_the_remainder() {
        let regions = vec![
            RegionTime {
                name: "a",
                total_ms: 30.0,
                calls: 6,
            },
            RegionTime {
                name: "b",
                total_ms: 12.0,
                calls: 3,
            },
        ];
        let p = StepProfile::new(regions, &[20.0, 22.0, 24.0]);
        assert_eq!(p.mean_step_ms, 22.0);
        assert_eq!((p.regions[0].ms, p.regions[0].calls), (10.0, 2.0));
        assert_eq!((p.regions[1].ms, p.regions[1].calls), (4.0, 1.0));
        assert_eq!(p.unaccounted_ms(), 8.0);
    }
}
