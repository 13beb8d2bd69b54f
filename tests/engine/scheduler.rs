//! `LcmScheduler` against diffusers' `LCMScheduler`: timesteps exactly, arithmetic within 1e-6.
use crate::common;

use lcm::config::read_config;
use lcm::random::TorchGenerator;
use lcm::schedulers::{LcmScheduler, LcmSchedulerConfig, TimestepRequest};
use serde_json::Value;

fn base_config(kind: &str) -> Value {
    let dir = match kind {
        "tiny-lcm" => "tiny-lcm",
        "sd15-pndm" => "tiny-sd",
        other => panic!("unknown config {other}"),
    };
    let path = common::fixtures().join("models").join(dir).join("scheduler/scheduler_config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn scheduler(kind: &str, overrides: &Value) -> LcmScheduler {
    let mut cfg = base_config(kind);
    for (k, v) in overrides.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    LcmScheduler::new(serde_json::from_value::<LcmSchedulerConfig>(cfg).unwrap()).unwrap()
}

fn opt_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

#[test]
fn from_config_reads_other_schedulers_configs() {
    let refs = common::reference_json("scheduler.json");
    for (kind, c) in refs["configs"].as_object().unwrap() {
        let ours: LcmSchedulerConfig = read_config(&common::fixtures().join(c["file"].as_str().unwrap())).unwrap();
        let eff: LcmSchedulerConfig = serde_json::from_value(c["effective_lcm_config"].clone()).unwrap();
        assert_eq!(ours, eff, "{kind}");
    }
}

#[test]
fn set_timesteps_matches_diffusers() {
    let refs = common::reference_json("scheduler.json");
    let cases = refs["set_timesteps"].as_array().unwrap();
    assert!(cases.len() > 40);
    let (mut ok, mut errors) = (0, 0);
    for case in cases {
        let mut s = scheduler(case["config"].as_str().unwrap(), &serde_json::json!({}));
        let req = TimestepRequest {
            num_inference_steps: opt_usize(&case["num_inference_steps"]),
            original_inference_steps: opt_usize(&case["original_inference_steps"]),
            timesteps: case["timesteps_arg"].as_array().map(|a| a.iter().map(|v| v.as_i64().unwrap()).collect()),
            strength: case["strength"].as_f64(),
        };
        let result = s.set_timesteps(&req);
        if case.get("error").is_some() {
            assert!(result.is_err(), "expected an error like diffusers ({}) for {case}", case["error"]);
            errors += 1;
        } else {
            result.unwrap_or_else(|e| panic!("{case}: {e}"));
            let want: Vec<i64> = case["timesteps"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(s.timesteps(), &want[..], "{case}");
            assert_eq!(s.num_inference_steps() as u64, case["num_inference_steps_after"].as_u64().unwrap(), "{case}");
            ok += 1;
        }
    }
    assert!(ok > 30 && errors >= 3, "ok {ok} errors {errors}");
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let refs = common::reference_json("scheduler.json");
    let tensors = common::reference("scheduler.safetensors");
    for (name, c) in refs["alphas_cumprod"].as_object().unwrap() {
        let s = scheduler(c["config"].as_str().unwrap(), &c["overrides"]);
        let want = common::to_vec_f32(&tensors[c["tensor"].as_str().unwrap()]);
        let got = s.alphas_cumprod();
        let max_rel = got.iter().zip(&want).map(|(a, b)| ((a - b) / b.abs().max(1e-12)).abs()).fold(0f32, f32::max);
        let max_abs = common::max_abs_diff(got, &want);
        assert!(max_abs <= 1e-6, "{name}: max abs diff {max_abs} (max rel {max_rel})");
    }
}

#[test]
fn steps_match_diffusers() {
    let refs = common::reference_json("scheduler.json");
    let tensors = common::reference("scheduler.safetensors");
    let cases = refs["step_cases"].as_object().unwrap();
    assert!(cases.len() >= 6);
    for (name, c) in cases {
        let mut s = scheduler(c["config"].as_str().unwrap(), &c["overrides"]);
        let custom = c["set_timesteps_call"].as_str().unwrap() != "set_timesteps(4)";
        let timesteps: Vec<i64> = c["timesteps"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        s.set_timesteps(&TimestepRequest {
            num_inference_steps: if custom { None } else { Some(4) },
            timesteps: if custom { Some(timesteps.clone()) } else { None },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.timesteps(), &timesteps[..], "{name}");
        let mut g = TorchGenerator::manual_seed(c["step_generator_seed"].as_u64().unwrap());
        let mut x = tensors[c["sample_in"].as_str().unwrap()].clone();
        for step in c["steps"].as_array().unwrap() {
            let t = step["timestep"].as_i64().unwrap();
            let (c_skip, c_out) = s.boundary_condition_scalings(t);
            assert!((c_skip as f64 - step["c_skip"].as_f64().unwrap()).abs() <= 1e-6, "{name} c_skip");
            assert!((c_out as f64 - step["c_out"].as_f64().unwrap()).abs() <= 1e-6, "{name} c_out");
            let mo = &tensors[step["model_output"].as_str().unwrap()];
            let (prev, den) = s.step(mo, t, &x, &mut g).unwrap();
            for (got, key) in [(&prev, "prev_sample"), (&den, "denoised")] {
                let want = common::to_vec_f32(&tensors[step[key].as_str().unwrap()]);
                let d = common::max_abs_diff(&common::to_vec_f32(got), &want);
                assert!(
                    d <= 1e-6 * want.iter().fold(1f32, |m, v| m.max(v.abs())),
                    "{name} step {} {key}: {d}",
                    step["index"]
                );
            }
            x = prev;
        }
    }
}

#[test]
fn bad_requests_are_errors() {
    let mut s = LcmScheduler::new(LcmSchedulerConfig::default()).unwrap();
    assert!(s.set_timesteps(&TimestepRequest { num_inference_steps: Some(0), ..Default::default() }).is_err());
    assert!(s.set_timesteps(&TimestepRequest { num_inference_steps: Some(51), ..Default::default() }).is_err());
    assert!(s
        .set_timesteps(&TimestepRequest { num_inference_steps: Some(4), strength: Some(1.5), ..Default::default() })
        .is_err());
    // Unknown prediction types and beta schedules are refused when the config is read.
    assert!(serde_json::from_str::<LcmSchedulerConfig>(r#"{"prediction_type": "flow"}"#).is_err());
    assert!(serde_json::from_str::<LcmSchedulerConfig>(r#"{"beta_schedule": "cosine"}"#).is_err());
}
