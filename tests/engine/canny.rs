//! `lcm::canny` against OpenCV's `cv2.Canny` (opencv-python-headless, see
//! tests/fixtures/make_canny_fixtures.py): real photographs (RGB and grayscale, odd sizes, a
//! posterized one with flat regions) at several threshold pairs, tiny random images, and hand-made
//! edge cases whose expected maps were checked with OpenCV.
use crate::common;

use lcm::canny::{canny, canny_edges};
use lcm::image_processor::Image8;
use serde_json::Value;

fn manifest() -> Value {
    let path = common::fixtures().join("canny/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn read(name: &str) -> Image8 {
    Image8::read(&common::fixtures().join("canny").join(name)).unwrap()
}

fn gray(width: usize, height: usize, pixels: &[u8]) -> Image8 {
    Image8 { width, height, channels: 1, pixels: pixels.to_vec() }
}

/// The single-channel map of `canny` (checking that its three channels are equal).
fn edges(image: &Image8, low: f64, high: f64) -> Vec<u8> {
    let out = canny(image, low, high).unwrap();
    assert_eq!((out.width, out.height, out.channels), (image.width, image.height, 3));
    assert!(out.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2] && (p[0] == 0 || p[0] == 255)));
    out.pixels.iter().step_by(3).copied().collect()
}

#[test]
fn photos_match_opencv() {
    let m = manifest();
    let mut worst = 100.0f64;
    for case in m["cases"].as_array().unwrap() {
        let (low, high) = (case["low"].as_f64().unwrap(), case["high"].as_f64().unwrap());
        let image = read(case["image"].as_str().unwrap());
        let want = read(case["edges"].as_str().unwrap());
        assert_eq!((want.width, want.height, want.channels), (image.width, image.height, 1));
        let got = edges(&image, low, high);
        let equal = got.iter().zip(&want.pixels).filter(|(a, b)| a == b).count();
        let pct = 100.0 * equal as f64 / got.len() as f64;
        let (n_got, n_want) = (got.iter().filter(|&&v| v > 0).count(), want.pixels.iter().filter(|&&v| v > 0).count());
        println!(
            "{} ({}x{}x{}) {low}/{high}: {pct:.4}% equal ({} differ), edge pixels {n_got} vs OpenCV {n_want}",
            case["image"].as_str().unwrap(),
            image.width,
            image.height,
            image.channels,
            got.len() - equal
        );
        assert_eq!(n_want as u64, case["edge_pixels"].as_u64().unwrap());
        worst = worst.min(pct);
    }
    println!("worst case: {worst:.4}% equal");
    assert!(worst >= 99.0, "a case has only {worst:.4}% of its pixels equal to OpenCV's");
}

#[test]
fn tiny_random_images_match_opencv() {
    let m = manifest();
    for (i, case) in m["tiny"].as_array().unwrap().iter().enumerate() {
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let bytes =
            |k: &str| case[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect::<Vec<u8>>();
        let (w, h, c) = (u("width"), u("height"), u("channels"));
        let (low, high) = (case["low"].as_f64().unwrap(), case["high"].as_f64().unwrap());
        let got = canny_edges(&bytes("pixels"), w, h, c, low, high).unwrap();
        assert_eq!(got, bytes("edges"), "tiny case {i}: {w}x{h}x{c} {low}/{high}");
    }
}

#[test]
fn one_pixel_and_constant_images_have_no_edges() {
    for c in [1, 3] {
        assert_eq!(canny_edges(&vec![7; c], 1, 1, c, 0.0, 0.0).unwrap(), vec![0]);
    }
    let flat = Image8 { width: 17, height: 9, channels: 3, pixels: vec![200; 17 * 9 * 3] };
    assert!(edges(&flat, 0.0, 0.0).iter().all(|&v| v == 0));
    assert!(edges(&gray(1, 5, &[0, 0, 0, 0, 0]), 0.0, 0.0).iter().all(|&v| v == 0));
}

#[test]
fn two_by_two_steps_follow_opencv_tie_rules() {
    // Equal magnitudes on both columns (rows): NMS keeps the left (upper) one, `m > left &&
    // m >= right` (`m > above && m >= below`); outside the image counts as magnitude 0.
    assert_eq!(edges(&gray(2, 2, &[0, 255, 0, 255]), 100.0, 200.0), [255, 0, 255, 0]);
    assert_eq!(edges(&gray(2, 2, &[0, 0, 255, 255]), 100.0, 200.0), [255, 255, 0, 0]);
}

#[test]
fn thresholds_are_strict_floored_and_swappable() {
    // A vertical step of 100: |dx| = 400 on columns 2 and 3, kept on column 2.
    let mut step = vec![0u8; 6 * 5];
    step.iter_mut().enumerate().filter(|(i, _)| i % 6 >= 3).for_each(|(_, v)| *v = 100);
    let img = gray(6, 5, &step);
    let column2: Vec<u8> = (0..30).map(|i| if i % 6 == 2 { 255 } else { 0 }).collect();
    assert_eq!(edges(&img, 100.0, 399.0), column2); // 400 > 399: a seed
    assert_eq!(edges(&img, 100.0, 399.9), column2); // floor(399.9) = 399
    assert_eq!(edges(&img, 399.9, 100.0), column2); // swapped
    assert!(edges(&img, 100.0, 400.0).iter().all(|&v| v == 0)); // 400 > 400 fails
    assert!(edges(&img, 400.0, 401.0).iter().all(|&v| v == 0));

    let photo = read("astronaut_203x157.png");
    assert_eq!(edges(&photo, 200.0, 100.0), edges(&photo, 100.0, 200.0));
    let cam = read("camera_gray_241x256.png");
    assert_eq!(edges(&cam, 150.0, 50.0), edges(&cam, 50.0, 150.0));
}

/// Rows of `0`/`1` as a 0/255 map.
fn map(rows: &[&str]) -> Vec<u8> {
    rows.iter().flat_map(|r| r.bytes().map(|b| if b == b'1' { 255 } else { 0 })).collect()
}

#[test]
fn diagonal_edge() {
    // A 200-valued square in the corner: a diagonal line (expected map from cv2.Canny).
    let mut px = vec![0u8; 25];
    for (y, x) in [(3, 3), (3, 4), (4, 3), (4, 4)] {
        px[y * 5 + x] = 200;
    }
    assert_eq!(edges(&gray(5, 5, &px), 100.0, 200.0), map(&["00000", "00000", "00001", "00010", "00100"]));
}

#[test]
fn hysteresis_keeps_weak_edges_only_when_connected() {
    // Columns 3-5 are 100 on the top three rows (|dx| = 400) and 40 below (160); columns 10-13
    // are 40 everywhere (160). Expected maps from cv2.Canny.
    let mut px = vec![0u8; 14 * 6];
    for y in 0..6 {
        for x in 3..6 {
            px[y * 14 + x] = if y < 3 { 100 } else { 40 };
        }
        for x in 10..14 {
            px[y * 14 + x] = 40;
        }
    }
    let img = gray(14, 6, &px);
    let left = ["00100100000000", "00100100000000", "00011100000000", "00010100000000"];
    let weak_left = ["00100100000000", "00100100000000"];
    let none = ["00000000000000", "00000000000000"];
    // Weak (160 > 100) and connected to the strong top rows: kept. The right step is weak and alone: dropped.
    assert_eq!(edges(&img, 100.0, 300.0), map(&[&left[..], &weak_left[..]].concat()));
    // 160 is not above the low threshold: only the strong part.
    assert_eq!(edges(&img, 200.0, 300.0), map(&[&left[..], &none[..]].concat()));
    // 160 > 150: the right step becomes strong too.
    let both: Vec<String> = map_rows(&[&left[..], &weak_left[..]].concat(), 9);
    assert_eq!(edges(&img, 100.0, 150.0), map(&both.iter().map(String::as_str).collect::<Vec<_>>()));
}

/// The rows with a `1` set at column `x`.
fn map_rows(rows: &[&str], x: usize) -> Vec<String> {
    rows.iter().map(|r| r.char_indices().map(|(i, c)| if i == x { '1' } else { c }).collect()).collect()
}

#[test]
fn bad_input_is_a_one_line_error() {
    let err = |r: anyhow::Result<Vec<u8>>| format!("{:#}", r.unwrap_err());
    for e in [
        err(canny_edges(&[], 0, 4, 1, 100.0, 200.0)),
        err(canny_edges(&[0; 3], 1, 1, 1, 100.0, 200.0)),
        err(canny_edges(&[0; 4], 2, 2, 1, -1.0, 200.0)),
        err(canny_edges(&[0; 4], 2, 2, 1, 100.0, f64::NAN)),
        err(canny_edges(&[0; 4], 2, 2, 1, 100.0, f64::INFINITY)),
    ] {
        assert!(e.starts_with("canny: ") && !e.contains('\n'), "{e}");
    }
    let empty = Image8 { width: 0, height: 0, channels: 3, pixels: vec![] };
    assert!(canny(&empty, 100.0, 200.0).is_err());
}
