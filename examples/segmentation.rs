//! Semantic segmentation with the Rust API: the loss of an (N, C, H, W) batch against uint8
//! masks where 255 marks unlabelled pixels, over ndarray views. The logits are produced
//! channels-last, (N, H, W, C), as many networks store them, and handed over as a permuted
//! view, without a copy; the per-pixel losses are written into an array the caller owns.
//!
//! Run with `cargo run --release --example segmentation`.

use cbce::{ClassBalancedLoss, Config, ForwardOptions, Reduction};
use ndarray::{Array3, Array4, Axis};

const CLASSES: usize = 4;
const IGNORE: i64 = 255;
const NAMES: [&str; CLASSES] = ["background", "road", "vehicle", "pedestrian"];

/// Masks with a road on the lower half, a vehicle whose outline is unlabelled, and one
/// pedestrian pixel per image.
fn masks(batch: usize, height: usize, width: usize) -> Array3<u8> {
    Array3::from_shape_fn((batch, height, width), |(n, h, w)| {
        let left = 2 + 4 * n;
        let in_vehicle = (3..=7).contains(&h) && (left..=left + 5).contains(&w);
        let on_outline = in_vehicle && (h == 3 || h == 7 || w == left || w == left + 5);
        if on_outline {
            IGNORE as u8
        } else if in_vehicle {
            2
        } else if h == 1 && w == width - 2 {
            3
        } else if h >= height / 2 {
            1
        } else {
            0
        }
    })
}

fn main() -> Result<(), cbce::Error> {
    let (batch, height, width) = (2, 12, 16);
    let masks = masks(batch, height, width);
    // A partly trained network's output, channels-last: a margin for the labelled class.
    let channels_last = Array4::from_shape_fn((batch, height, width, CLASSES), |(n, h, w, c)| {
        let wobble = ((n * 31 + h * 7 + w * 3 + c * 11) % 17) as f32 / 8.0 - 1.0;
        wobble + if masks[[n, h, w]] as usize == c { 1.5 } else { 0.0 }
    });
    let logits = channels_last.view().permuted_axes([0, 3, 1, 2]);
    assert_eq!(logits.shape(), [batch, CLASSES, height, width]);

    let loss = ClassBalancedLoss::new(Config::new(CLASSES).with_ema_decay(0.9))?;
    for _ in 0..30 {
        loss.update(masks.view(), IGNORE)?;
    }
    let options = ForwardOptions { ignore_index: IGNORE, ..ForwardOptions::default() };
    let mean = loss.forward(logits, masks.view(), &options, false)?;

    let counts = loss.class_counts(masks.view(), IGNORE)?;
    let prevalences = loss.prevalences();
    println!(
        "cbce {} segmentation: logits (N, C, H, W) = {:?}, channels-last in memory",
        env!("CARGO_PKG_VERSION"),
        logits.shape()
    );
    println!("{:<11} {:>6} {:>11} {:>7}", "class", "pixels", "prevalence", "weight");
    for class in 0..CLASSES {
        println!(
            "{:<11} {:>6} {:>11.4} {:>7.3}",
            NAMES[class], counts[class], prevalences[class], mean.summary.weights_used[class]
        );
    }
    println!("mean loss {:.6}", mean.summary.loss);

    // One loss per pixel, into an array the caller owns; unlabelled pixels get 0.
    let per_pixel_options =
        ForwardOptions { reduction: Reduction::None, update_prevalences: false, ..options };
    let mut pixel_losses = Array3::<f32>::zeros((batch, height, width));
    loss.forward_into(
        logits.into_dyn(),
        masks.view().into_dyn(),
        &per_pixel_options,
        pixel_losses.view_mut().into_dyn(),
        None,
    )?;
    let labelled = masks.iter().filter(|&&label| i64::from(label) != IGNORE).count();
    let unlabelled_loss: f32 = pixel_losses
        .iter()
        .zip(masks.iter())
        .filter(|(_, &label)| i64::from(label) == IGNORE)
        .map(|(loss, _)| loss.abs())
        .sum();
    let per_image: Vec<f32> = pixel_losses.sum_axis(Axis(2)).sum_axis(Axis(1)).to_vec();
    println!("{labelled} labelled pixels; summed loss per image {per_image:.4?}");

    // The mean is the sum of the per-pixel losses over the weight of the labelled pixels.
    let summed: f64 = pixel_losses.iter().map(|&x| f64::from(x)).sum();
    let from_pixels = summed / mean.summary.weight_sum;
    assert!(unlabelled_loss == 0.0, "unlabelled pixels must not add to the loss");
    assert!(
        (from_pixels - mean.summary.loss).abs() <= 1e-5 * mean.summary.loss,
        "the per-pixel losses give a mean of {from_pixels}, not {}",
        mean.summary.loss
    );
    println!("the per-pixel losses give the same mean: {from_pixels:.6}");
    Ok(())
}
