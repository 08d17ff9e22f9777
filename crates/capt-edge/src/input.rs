//! The request decode path: raw or multipart bodies become preprocessed NCHW floats. Every
//! malformed input (truncated file, text, zero bytes, decompression bomb, absurd header) ends
//! as an [`InputError`] that names the image and maps to a 4xx status; nothing here panics
//! (the fuzz target `fuzz_targets/decode.rs` drives these functions).

use std::io::Cursor;

/// Re-exported for callers building [`NamedImage`]s.
pub use bytes::Bytes;
use capt_core::{PreprocessConfig, PreprocessError};

/// Limits on what a request may contain.
#[derive(Debug, Clone)]
pub struct InputLimits {
    /// Largest width*height accepted, checked on the header before any pixel is decoded.
    pub max_pixels: u64,
    /// Most images in one request.
    pub max_images: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000,
            max_images: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{name} is empty (0 bytes); send the image file's bytes as the body or as a multipart file part")]
    Empty { name: String },
    #[error("{name} is {width}x{height} = {pixels} pixels, more than the server's limit of {max} pixels; downscale it before sending")]
    TooManyPixels {
        name: String,
        width: u32,
        height: u32,
        pixels: u64,
        max: u64,
    },
    #[error("request has {count} images, more than the limit of {max} per request; split it")]
    TooManyImages { count: usize, max: usize },
    #[error("request has no images; send an image body or multipart file parts")]
    NoImages,
    #[error("malformed multipart body: {0}")]
    Multipart(String),
    #[error("content type {0:?} is not accepted; send image/* (or application/octet-stream) or multipart/form-data")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Image(#[from] PreprocessError),
}

impl InputError {
    /// HTTP status for this error: 413 for size limits, 415 for the media type, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooManyPixels { .. } | Self::TooManyImages { .. } => 413,
            Self::Image(PreprocessError::TooLarge { .. }) => 413,
            Self::UnsupportedMediaType(_) => 415,
            _ => 400,
        }
    }

    /// Stable machine-readable code for JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty { .. } => "empty_image",
            Self::TooManyPixels { .. } | Self::Image(PreprocessError::TooLarge { .. }) => {
                "image_too_large"
            }
            Self::TooManyImages { .. } => "too_many_images",
            Self::NoImages => "no_images",
            Self::Multipart(_) => "bad_multipart",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Image(_) => "bad_image",
        }
    }
}

/// One named image of a request.
#[derive(Debug, Clone)]
pub struct NamedImage {
    /// Multipart file name (or field name), or "body" for a raw body.
    pub name: String,
    pub bytes: bytes::Bytes,
}

/// Preprocessed images of one request.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub names: Vec<String>,
    /// NCHW floats, `names.len()` images.
    pub pixels: Vec<f32>,
}

/// Decodes and preprocesses one image into CHW floats.
pub fn decode_one(
    bytes: &[u8],
    name: &str,
    limits: &InputLimits,
    pre: &PreprocessConfig,
) -> Result<Vec<f32>, InputError> {
    if bytes.is_empty() {
        return Err(InputError::Empty {
            name: name.to_string(),
        });
    }
    // Header-only look at the size, so a small file that claims a huge canvas (a PNG bomb)
    // is refused before a decoder allocates for it.
    if let Ok(reader) = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format() {
        if let Ok((width, height)) = reader.into_dimensions() {
            let pixels = width as u64 * height as u64;
            if pixels > limits.max_pixels {
                return Err(InputError::TooManyPixels {
                    name: name.to_string(),
                    width,
                    height,
                    pixels,
                    max: limits.max_pixels,
                });
            }
        }
    }
    Ok(pre.preprocess_bytes(bytes, name)?)
}

/// Decodes all images of a request into one NCHW buffer.
pub fn decode_all(
    images: &[NamedImage],
    limits: &InputLimits,
    pre: &PreprocessConfig,
) -> Result<Decoded, InputError> {
    check_count(images.len(), limits)?;
    let per = pre.image_len();
    let mut pixels = Vec::with_capacity(per * images.len());
    for img in images {
        pixels.extend(decode_one(&img.bytes, &img.name, limits, pre)?);
    }
    Ok(Decoded {
        names: images.iter().map(|i| i.name.clone()).collect(),
        pixels,
    })
}

pub fn check_count(count: usize, limits: &InputLimits) -> Result<(), InputError> {
    if count == 0 {
        return Err(InputError::NoImages);
    }
    if count > limits.max_images {
        return Err(InputError::TooManyImages {
            count,
            max: limits.max_images,
        });
    }
    Ok(())
}

/// How a request body is to be read, from its Content-Type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// The body is one image file.
    Raw,
    /// multipart/form-data with this boundary; every part with content is an image.
    Multipart { boundary: String },
}

/// Classifies a Content-Type header value. A missing type is treated as a raw image.
pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, InputError> {
    let Some(ct) = content_type.map(str::trim).filter(|c| !c.is_empty()) else {
        return Ok(BodyKind::Raw);
    };
    let mut parts = ct.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "multipart/form-data" {
        let boundary = parts
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 200)
            .ok_or_else(|| {
                InputError::Multipart("multipart/form-data without a boundary parameter".into())
            })?;
        return Ok(BodyKind::Multipart { boundary });
    }
    if mime.starts_with("image/") || mime == "application/octet-stream" {
        return Ok(BodyKind::Raw);
    }
    Err(InputError::UnsupportedMediaType(mime))
}

/// Splits a complete multipart/form-data body into its non-empty parts, in order. Kept
/// synchronous and allocation-bounded (the body is already limited in size) so the fuzz
/// target can drive it; parts without a filename use their field name.
pub fn split_multipart(
    body: &[u8],
    boundary: &str,
    limits: &InputLimits,
) -> Result<Vec<NamedImage>, InputError> {
    let bad = |m: &str| InputError::Multipart(m.to_string());
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut pos = find(body, delim, 0).ok_or_else(|| bad("opening boundary not found"))?;
    let mut out = Vec::new();
    loop {
        pos += delim.len();
        if body[pos..].starts_with(b"--") {
            break; // closing delimiter
        }
        pos =
            skip_line_end(body, pos).ok_or_else(|| bad("boundary not followed by a line break"))?;
        let head_end =
            find(body, b"\r\n\r\n", pos).ok_or_else(|| bad("part headers not terminated"))?;
        let headers = std::str::from_utf8(&body[pos..head_end])
            .map_err(|_| bad("part headers are not UTF-8"))?;
        let content_start = head_end + 4;
        let mut end_delim = b"\r\n".to_vec();
        end_delim.extend_from_slice(delim);
        let content_end = find(body, &end_delim, content_start)
            .ok_or_else(|| bad("part not closed by a boundary"))?;
        let name = part_name(headers).unwrap_or_else(|| format!("part #{}", out.len()));
        let content = &body[content_start..content_end];
        if !content.is_empty() {
            if out.len() == limits.max_images {
                return Err(InputError::TooManyImages {
                    count: out.len() + 1,
                    max: limits.max_images,
                });
            }
            out.push(NamedImage {
                name,
                bytes: bytes::Bytes::copy_from_slice(content),
            });
        }
        pos = content_end + 2;
    }
    check_count(out.len(), limits)?;
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn skip_line_end(body: &[u8], pos: usize) -> Option<usize> {
    // Transport padding (spaces/tabs) may follow the boundary before the CRLF.
    let mut p = pos;
    while p < body.len() && (body[p] == b' ' || body[p] == b'\t') {
        p += 1;
    }
    body[p..].starts_with(b"\r\n").then_some(p + 2)
}

/// `filename` (preferred) or `name` of a part's Content-Disposition header.
fn part_name(headers: &str) -> Option<String> {
    let disp = headers
        .split("\r\n")
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
        })?
        .1;
    let param = |key: &str| {
        disp.split(';').find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(key)
                .then(|| v.trim().trim_matches('"').to_string())
        })
    };
    param("filename")
        .or_else(|| param("name"))
        .filter(|s| !s.is_empty())
}

/// Builds a multipart/form-data body with one file part per image; returns the content type
/// and the body. Used by the HTTP client, the load test and the tests.
pub fn multipart_body(files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "capt-edge-boundary-7d1c9a";
    let mut body = Vec::new();
    for (i, (name, bytes)) in files.iter().enumerate() {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"image{i}\"; filename=\"{name}\"\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn content_types() {
        assert_eq!(body_kind(None).unwrap(), BodyKind::Raw);
        assert_eq!(body_kind(Some("image/jpeg")).unwrap(), BodyKind::Raw);
        assert_eq!(
            body_kind(Some("multipart/form-data; boundary=\"abc\"")).unwrap(),
            BodyKind::Multipart {
                boundary: "abc".into()
            }
        );
        assert_eq!(
            body_kind(Some("application/json")).unwrap_err().status(),
            415
        );
        assert_eq!(
            body_kind(Some("multipart/form-data")).unwrap_err().status(),
            400
        );
    }

    #[test]
    fn multipart_round_trip() {
        let a = png(4, 4);
        let (ct, body) = multipart_body(&[("a.png", &a), ("b.png", b"xyz")]);
        let BodyKind::Multipart { boundary } = body_kind(Some(&ct)).unwrap() else {
            panic!("not multipart")
        };
        let parts = split_multipart(&body, &boundary, &InputLimits::default()).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "a.png");
        assert_eq!(&parts[0].bytes[..], &a[..]);
        assert_eq!(&parts[1].bytes[..], b"xyz");
        let limits = InputLimits {
            max_images: 1,
            ..Default::default()
        };
        assert_eq!(
            split_multipart(&body, &boundary, &limits)
                .unwrap_err()
                .status(),
            413
        );
        assert!(
            split_multipart(&body[..body.len() / 2], &boundary, &InputLimits::default()).is_err()
        );
        assert!(split_multipart(b"", &boundary, &InputLimits::default()).is_err());
    }

    #[test]
    fn decode_errors_are_4xx() {
        let pre = PreprocessConfig::clip(8);
        let l = InputLimits {
            max_pixels: 100,
            max_images: 4,
        };
        assert_eq!(
            decode_one(b"", "x", &l, &pre).unwrap_err().code(),
            "empty_image"
        );
        assert_eq!(
            decode_one(b"hello world", "x", &l, &pre)
                .unwrap_err()
                .status(),
            400
        );
        let big = png(20, 20);
        let e = decode_one(&big, "big.png", &l, &pre).unwrap_err();
        assert_eq!((e.status(), e.code()), (413, "image_too_large"));
        assert!(e.to_string().contains("big.png"));
        let ok = png(9, 9);
        assert_eq!(decode_one(&ok, "ok.png", &l, &pre).unwrap().len(), 3 * 64);
        let trunc = &ok[..ok.len() / 2];
        assert_eq!(
            decode_one(trunc, "t.png", &l, &pre).unwrap_err().status(),
            400
        );
    }
}
