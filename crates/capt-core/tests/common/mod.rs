//! Hostile and broken image files built from the real fixtures.
#![allow(dead_code)] // each test binary uses a subset

use std::io::Write;
use std::path::{Path, PathBuf};

pub const HUGE: u32 = 20_000;

pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/core/images/src")
        .join(name)
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A well-formed PNG header claiming `w x h` RGB, with one tiny IDAT.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0u8; 64]).unwrap();
    png_chunk(&mut out, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A real JPEG whose start-of-frame claims `w x h`.
pub fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut b = fixture("eurosat_tiny.jpg");
    let sof = b
        .windows(2)
        .position(|m| m[0] == 0xff && (m[1] == 0xc0 || m[1] == 0xc2))
        .expect("SOF marker");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

/// A real BMP whose info header claims `w x h`.
pub fn bmp_claiming(w: i32, h: i32) -> Vec<u8> {
    let mut b = fixture("caltech_bmp.bmp");
    b[18..22].copy_from_slice(&w.to_le_bytes());
    b[22..26].copy_from_slice(&h.to_le_bytes());
    b
}

/// An extended (VP8X) WebP whose canvas claims `w x h`, followed by a real VP8 frame.
pub fn webp_claiming(w: u32, h: u32) -> Vec<u8> {
    let real = fixture("dtd_webp.webp");
    let mut body = b"WEBPVP8X".to_vec();
    body.extend_from_slice(&10u32.to_le_bytes());
    body.extend_from_slice(&[0, 0, 0, 0]);
    body.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    body.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    body.extend_from_slice(&real[12..]);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}
