//! OpenAI's Images API as the official clients call it.
mod common;

use common::*;
use serde_json::json;

#[test]
fn generations_formats_urls_and_errors() {
    let ts = TestServer::start(config());
    let url = ts.url("/v1/images/generations");
    let r = post_json(&url, &json!({"prompt": "a cat", "n": 2, "size": "32x32", "seed": 9, "num_inference_steps": 2}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let v = r.json();
    assert_eq!(v["size"], "32x32");
    let req = lcm::pipelines::GenerateRequest {
        prompt: "a cat".into(),
        seed: 9,
        num_inference_steps: 2,
        num_images_per_prompt: 2,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let want = library_png("models/tiny-lcm", &req);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&unb64(v["data"][i]["b64_json"].as_str().unwrap()), w);
    }
    // JPEG / WebP, and URLs served by us.
    for (format, magic) in [("jpeg", &b"\xff\xd8"[..]), ("webp", &b"RIFF"[..])] {
        let r = post_json(&url, &json!({"prompt": "a cat", "output_format": format, "num_inference_steps": 1})).json();
        assert!(unb64(r["data"][0]["b64_json"].as_str().unwrap()).starts_with(magic), "{format}");
    }
    let r = post_json(
        &url,
        &json!({"prompt": "a cat", "response_format": "url", "seed": 9, "num_inference_steps": 2, "n": 2, "size": "32x32"}),
    );
    let link = r.json()["data"][1]["url"].as_str().unwrap().to_string();
    assert!(link.starts_with(&ts.base), "{link}");
    assert_eq!(get(&link).bytes, want[1]);
    let models = get(&ts.url("/v1/models")).json();
    assert_eq!(models["data"][0]["id"], "tiny-lcm");
    assert_eq!(models["object"], "list");

    // Errors in OpenAI's shape.
    for (body, status, param) in [
        (json!({"prompt": "x", "size": "big"}), 400, Some("size")),
        (json!({"prompt": "x", "response_format": "gif"}), 400, Some("response_format")),
        (json!({"prompt": "x", "model": "dall-e-3"}), 404, None),
        (json!({"prompt": "x", "model": "..\\models"}), 400, None),
        (json!({"prompt": "x", "size": "100000x100000"}), 400, None),
        (json!({"n": 1}), 400, None),
    ] {
        let r = post_json(&url, &body);
        assert_eq!(r.status, status, "{body}: {}", String::from_utf8_lossy(&r.bytes));
        let e = &r.json()["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{e}");
        if let Some(p) = param {
            assert_eq!(e["param"], p);
        }
    }
}

#[test]
fn streaming_partial_images_then_completed() {
    let ts = TestServer::start(config());
    let resp = agent()
        .post(&ts.url("/v1/images/generations"))
        .send_json(json!({"prompt": "a cat", "stream": true, "partial_images": 2, "seed": 1, "num_inference_steps": 4}))
        .unwrap();
    assert!(resp.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = read_sse(resp.into_reader());
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    assert_eq!(events[1].1["partial_image_index"], 1);
    let req = lcm::pipelines::GenerateRequest { prompt: "a cat".into(), seed: 1, ..Default::default() };
    assert_eq!(unb64(events[2].1["b64_json"].as_str().unwrap()), library_png("models/tiny-lcm", &req)[0]);
}

/// An RGBA PNG whose alpha is 0 where `mask` is white.
fn alpha_png(mask: &lcm::image_processor::Image8) -> Vec<u8> {
    let m = mask.to_grayscale();
    let rgba: Vec<u8> = m.pixels.iter().flat_map(|&v| [0, 0, 0, if v == 255 { 0 } else { 255 }]).collect();
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgba,
        m.width as u32,
        m.height as u32,
        image::ExtendedColorType::Rgba8,
    )
    .unwrap();
    png
}

#[test]
fn edits_with_an_alpha_mask_and_without() {
    let ts = TestServer::start(config());
    let photo_path = fixtures().join("images/photo_45x37.png");
    let photo = std::fs::read(&photo_path).unwrap();
    let mask = lcm::image_processor::Image8::read(&fixtures().join("images/mask_45x37.png")).unwrap();
    let binary = {
        let g = mask.to_grayscale();
        lcm::image_processor::Image8 { pixels: g.pixels.iter().map(|&v| if v == 255 { 255 } else { 0 }).collect(), ..g }
    };
    let (ct, body) = multipart(&[
        ("image", Some("photo.png"), &photo),
        ("mask", Some("mask.png"), &alpha_png(&mask)),
        ("prompt", None, b"a lake"),
        ("model", None, b"tiny-sd"),
        ("seed", None, b"6"),
    ]);
    let r = post_raw(&ts.url("/v1/images/edits"), &ct, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let image = lcm::image_processor::Image8::read(&photo_path).unwrap();
    let req = lcm::pipelines::GenerateRequest {
        prompt: "a lake".into(),
        seed: 6,
        image: Some(image.clone()),
        mask_image: Some(binary),
        ..Default::default()
    };
    assert_eq!(unb64(r.json()["data"][0]["b64_json"].as_str().unwrap()), library_png("models/tiny-sd", &req)[0]);

    // Without a mask: image-to-image.
    let (ct, body) = multipart(&[
        ("image[]", Some("photo.png"), &photo),
        ("prompt", None, b"a lake"),
        ("seed", None, b"6"),
        ("strength", None, b"0.6"),
    ]);
    let r = post_raw(&ts.url("/v1/images/edits"), &ct, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let req = lcm::pipelines::GenerateRequest {
        prompt: "a lake".into(),
        seed: 6,
        image: Some(image),
        strength: Some(0.6),
        ..Default::default()
    };
    assert_eq!(unb64(r.json()["data"][0]["b64_json"].as_str().unwrap()), library_png("models/tiny-lcm", &req)[0]);

    // A mask without alpha, of another size, non-image bytes, no image: 400 in OpenAI's shape.
    let other = std::fs::read(fixtures().join("images/mask_50x30.png")).unwrap();
    let rgb_mask = std::fs::read(fixtures().join("images/mask_45x37_rgb.png")).unwrap();
    for (parts, param) in [
        (
            vec![
                ("image", Some("p.png"), &photo[..]),
                ("mask", Some("m.png"), &rgb_mask[..]),
                ("prompt", None, &b"x"[..]),
            ],
            "mask",
        ),
        (
            vec![
                ("image", Some("p.png"), &photo[..]),
                ("mask", Some("m.png"), &other[..]),
                ("prompt", None, &b"x"[..]),
            ],
            "mask",
        ),
        (vec![("image", Some("p.png"), &b"GIF89a-not-really"[..]), ("prompt", None, &b"x"[..])], "image"),
        (vec![("prompt", None, &b"x"[..])], "image"),
    ] {
        let (ct, body) = multipart(&parts);
        let r = post_raw(&ts.url("/v1/images/edits"), &ct, &body);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.bytes));
        assert_eq!(r.json()["error"]["param"], param);
    }
    let r = post_raw(&ts.url("/v1/images/edits"), "application/json", b"{}");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].is_string());
}
