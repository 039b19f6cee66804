//! Every case of the reference's recorded vectors (`../shared/vectors/reference.json`, or the
//! file named by `CBCE_REFERENCE_VECTORS`), replayed step by step through the Rust API.
//!
//! Tolerances are those of the vectors' README: losses and gradients within 1e-5 relative or
//! 1e-6 absolute; prevalences and weights much closer, within 4e-7 relative (a few float32
//! ulps).

use cbce::{ClassBalancedLoss, Config, ForwardOptions, Reduction};
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;
use std::path::PathBuf;

fn vectors_path() -> PathBuf {
    match std::env::var_os("CBCE_REFERENCE_VECTORS") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/reference.json"),
    }
}

fn load_cases() -> Vec<Value> {
    let path = vectors_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the reference vectors at {}: {e}", path.display()));
    let document: Value = serde_json::from_str(&text).expect("reference vectors are JSON");
    document["cases"].as_array().expect("a list of cases").clone()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_f64().map_or(f32::NAN, |x| x as f32))
        .collect()
}

fn shape(value: &Value) -> Vec<usize> {
    value.as_array().expect("a shape").iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

fn labels(step: &Value) -> ArrayD<i64> {
    let data: Vec<i64> =
        step["target"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    ArrayD::from_shape_vec(IxDyn(&shape(&step["target_shape"])), data).unwrap()
}

/// Compares element by element; NaN must meet NaN.
fn assert_close(what: &str, actual: &[f32], expected: &[f32], rel: f32, abs: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if e.is_nan() {
            assert!(a.is_nan(), "{what}[{i}]: expected NaN, got {a}");
            continue;
        }
        let tolerance = abs.max(rel * e.abs());
        assert!(
            (a - e).abs() <= tolerance,
            "{what}[{i}]: expected {e}, got {a} (tolerance {tolerance})"
        );
    }
}

const LOSS_REL: f32 = 1e-5;
const LOSS_ABS: f32 = 1e-6;
const STATE_REL: f32 = 4e-7;
const STATE_ABS: f32 = 1e-9;

fn check_state(context: &str, loss: &ClassBalancedLoss, expected: &Value) {
    assert_close(
        &format!("{context} class_prevalences"),
        &loss.prevalences(),
        &floats(&expected["class_prevalences"]),
        STATE_REL,
        STATE_ABS,
    );
    assert_close(
        &format!("{context} class_weights"),
        &loss.weights(),
        &floats(&expected["class_weights"]),
        STATE_REL,
        STATE_ABS,
    );
}

fn reduction(name: &str) -> Reduction {
    match name {
        "mean" => Reduction::Mean,
        "sum" => Reduction::Sum,
        "none" => Reduction::None,
        other => panic!("unknown reduction {other}"),
    }
}

fn run_forward(context: &str, loss: &ClassBalancedLoss, step: &Value) {
    let opts = &step["options"];
    let options = ForwardOptions {
        reduction: reduction(opts["reduction"].as_str().unwrap()),
        ignore_index: opts["ignore_index"].as_i64().unwrap(),
        label_smoothing: opts["label_smoothing"].as_f64().unwrap(),
        update_prevalences: opts["update_class_prevalences"].as_bool().unwrap(),
        grad_scale: 1.0,
    };
    let input = ArrayD::from_shape_vec(IxDyn(&shape(&step["input_shape"])), floats(&step["input"]))
        .unwrap();
    let target = labels(step);
    let expected = &step["expected"];

    let grad = if options.reduction == Reduction::None {
        // The gradient of sum(loss * grad_output): the forward's losses, then backward.
        let out = loss.forward(input.view(), target.view(), &options, false).unwrap();
        let grad_output =
            ArrayD::from_shape_vec(target.raw_dim(), floats(&step["grad_output"])).unwrap();
        assert_close(
            &format!("{context} loss"),
            out.loss.as_slice().unwrap(),
            &floats(&expected["loss"]),
            LOSS_REL,
            LOSS_ABS,
        );
        assert_close(
            &format!("{context} weights_used"),
            &out.summary.weights_used,
            &floats(&expected["weights_used"]),
            STATE_REL,
            STATE_ABS,
        );
        cbce::backward(
            input.view(),
            target.view(),
            grad_output.view(),
            &out.summary.weights_used,
            &options,
        )
        .unwrap()
    } else {
        let out = loss.forward(input.view(), target.view(), &options, true).unwrap();
        assert_close(
            &format!("{context} loss"),
            &[out.loss.iter().copied().next().unwrap()],
            &floats(&expected["loss"]),
            LOSS_REL,
            LOSS_ABS,
        );
        assert_close(
            &format!("{context} weights_used"),
            &out.summary.weights_used,
            &floats(&expected["weights_used"]),
            STATE_REL,
            STATE_ABS,
        );
        out.grad.unwrap()
    };
    assert_close(
        &format!("{context} grad_input"),
        grad.as_slice().unwrap(),
        &floats(&expected["grad_input"]),
        LOSS_REL,
        LOSS_ABS,
    );
    check_state(context, loss, expected);
}

#[test]
fn every_reference_case_is_reproduced() {
    let cases = load_cases();
    assert!(!cases.is_empty(), "the vectors file holds no case");
    let mut steps_checked = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let config = Config::new(case["config"]["num_classes"].as_u64().unwrap() as usize)
            .with_ema_decay(case["config"]["ema_decay"].as_f64().unwrap());
        let loss = ClassBalancedLoss::new(config).unwrap();
        for (index, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let context = format!("{name} step {index}");
            match step["kind"].as_str().unwrap() {
                "update" => {
                    let target = labels(step);
                    loss.update(target.view(), step["ignore_index"].as_i64().unwrap()).unwrap();
                    check_state(&context, &loss, &step["expected"]);
                }
                "forward" => run_forward(&context, &loss, step),
                other => panic!("{context}: unknown step kind {other}"),
            }
            steps_checked += 1;
        }
    }
    assert!(steps_checked >= cases.len());
}
