//! Noise schedulers. LCM is the one this project is about.
pub mod lcm;
pub use lcm::{BetaSchedule, LcmScheduler, LcmSchedulerConfig, PredictionType, TimestepRequest};
