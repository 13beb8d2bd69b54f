//! Prometheus text for `/metrics`: queue depth, jobs by outcome, job and step latency.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
struct Summary {
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    succeeded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    rejected_full: AtomicU64,
    rejected_invalid: AtomicU64,
    jobs: Mutex<Summary>,
    steps: Mutex<Summary>,
}

impl Metrics {
    pub fn job_finished(&self, outcome: &str, took: Option<Duration>) {
        let counter = match outcome {
            "succeeded" => &self.succeeded,
            "failed" => &self.failed,
            _ => &self.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let (Some(t), "succeeded") = (took, outcome) {
            let mut s = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            s.sum += t.as_secs_f64();
            s.count += 1;
        }
    }

    pub fn step_finished(&self, took: Duration) {
        let mut s = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        s.sum += took.as_secs_f64();
        s.count += 1;
    }

    pub fn rejected(&self, queue_full: bool) {
        if queue_full { &self.rejected_full } else { &self.rejected_invalid }.fetch_add(1, Ordering::Relaxed);
    }

    /// The mean time of a successful job, once there was one.
    pub fn mean_job_seconds(&self) -> Option<f64> {
        let s = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        (s.count > 0).then(|| s.sum / s.count as f64)
    }

    /// The exposition text.
    pub fn render(&self, queue_depth: usize, running: bool) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge("lcm_queue_depth", "Jobs waiting in the queue.", queue_depth as f64);
        gauge("lcm_jobs_running", "Jobs running (0 or 1).", if running { 1.0 } else { 0.0 });
        let _ = writeln!(out, "# HELP lcm_jobs_total Finished jobs by outcome.\n# TYPE lcm_jobs_total counter");
        for (outcome, c) in [("succeeded", &self.succeeded), ("failed", &self.failed), ("cancelled", &self.cancelled)] {
            let _ = writeln!(out, "lcm_jobs_total{{outcome=\"{outcome}\"}} {}", c.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP lcm_requests_rejected_total Requests not queued.\n# TYPE lcm_requests_rejected_total counter"
        );
        for (reason, c) in [("queue_full", &self.rejected_full), ("invalid", &self.rejected_invalid)] {
            let _ = writeln!(out, "lcm_requests_rejected_total{{reason=\"{reason}\"}} {}", c.load(Ordering::Relaxed));
        }
        for (name, help, m) in [
            ("lcm_job_duration_seconds", "Time from start to result of successful jobs.", &self.jobs),
            (
                "lcm_step_duration_seconds",
                "Time of one denoising step (the first includes text encoding).",
                &self.steps,
            ),
        ] {
            let s = m.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} summary\n{name}_sum {}\n{name}_count {}",
                s.sum, s.count
            );
        }
        out
    }
}
