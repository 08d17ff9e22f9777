//! Confusion heatmaps for reports: a labelled SVG (class names on both axes, a colour bar,
//! counts in the cells where they fit) and a small unlabelled PNG thumbnail.
//!
//! The SVG is written by hand rather than with a plotting crate: a grid of rectangles and
//! text is a few dozen lines, the viewer renders the text (no font files to bundle, unlike a
//! raster backend), and it stays sharp when zoomed into a 100-class matrix.

use capt_method::metrics::ConfusionMatrix;

/// White -> yellow -> red -> dark red for `v` in [0, 1].
fn heat_rgb(v: f64) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let (r, g, b) = if v < 0.5 {
        let t = v / 0.5;
        (255.0, 255.0 - 55.0 * t, 255.0 * (1.0 - t))
    } else {
        let t = (v - 0.5) / 0.5;
        (255.0 - 115.0 * t, 200.0 * (1.0 - t), 0.0)
    };
    [r as u8, g as u8, b as u8]
}

/// The row-normalised matrix: cell `(i, j)` is the fraction of class `i`'s images predicted
/// `j` (0 for a class without images), row-major.
fn fractions(m: &ConfusionMatrix) -> Vec<f64> {
    let n = m.num_classes;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        let row: u64 = (0..n).map(|k| m.get(i, k)).sum();
        out.extend((0..n).map(|j| {
            if row == 0 {
                0.0
            } else {
                m.get(i, j) as f64 / row as f64
            }
        }));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Class names longer than this are cut with an ellipsis (the full name is in the tooltip).
const MAX_LABEL: usize = 32;

fn short(s: &str) -> String {
    if s.chars().count() <= MAX_LABEL {
        s.to_string()
    } else {
        s.chars().take(MAX_LABEL - 1).collect::<String>() + "…"
    }
}

/// The labelled heatmap as an SVG document: rows are true classes, columns predictions, colour
/// the row-normalised fraction, numbers the raw counts (when the cell is big enough).
pub fn svg(m: &ConfusionMatrix, class_names: &[String], title: &str) -> String {
    let n = m.num_classes.max(1);
    // Cells shrink with the class count but stay legible: 44 px for a handful of classes,
    // 9 px for 100+ (zoom in; it is vector).
    let cell = (720.0 / n as f64).clamp(9.0, 44.0);
    let font = (cell * 0.7).clamp(7.0, 12.0);
    let longest = class_names
        .iter()
        .map(|c| short(c).chars().count())
        .max()
        .unwrap_or(1) as f64;
    let label_w = longest * font * 0.6 + 8.0;
    let (left, top) = (label_w + 24.0, label_w * 0.87 + 40.0);
    let grid = cell * n as f64;
    let bar_x = left + grid + 24.0;
    // Wide enough for the title too (bold 14 px: ~8.5 px a character).
    let width = (bar_x + 70.0).max(16.0 + title.chars().count() as f64 * 8.5);
    let height = top + grid + 40.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    // Axis titles.
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">predicted class</text>\n",
        left + grid / 2.0,
        height - 12.0
    ));
    s.push_str(&format!(
        "<text font-size=\"12\" text-anchor=\"middle\" transform=\"translate(12 {:.1}) rotate(-90)\">true class</text>\n",
        top + grid / 2.0
    ));
    // Row labels (right-aligned against the grid) and column labels (rotated above it).
    for (i, name) in class_names.iter().enumerate().take(n) {
        let c = i as f64 * cell + cell / 2.0;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"{font:.1}\" text-anchor=\"end\" dominant-baseline=\"middle\"><title>{}</title>{}</text>\n",
            left - 4.0,
            top + c,
            escape(name),
            escape(&short(name))
        ));
        s.push_str(&format!(
            "<text font-size=\"{font:.1}\" dominant-baseline=\"middle\" transform=\"translate({:.1} {:.1}) rotate(-60)\"><title>{}</title>{}</text>\n",
            left + c,
            top - 4.0,
            escape(name),
            escape(&short(name))
        ));
    }
    // Grid lines, then only the non-empty cells (a 100-class matrix is mostly empty: the file
    // stays small).
    for k in 0..=n {
        let o = k as f64 * cell;
        s.push_str(&format!(
            "<path d=\"M{left:.1} {:.1}h{grid:.1}M{:.1} {top:.1}v{grid:.1}\" stroke=\"#e4e4e4\" stroke-width=\"0.5\"/>\n",
            top + o,
            left + o
        ));
    }
    let show_counts = cell >= 18.0;
    let fr = fractions(m);
    // Cells over the real class count (`n` is at least 1 for the layout only).
    for i in 0..m.num_classes {
        for j in 0..m.num_classes {
            let count = m.get(i, j);
            if count == 0 {
                continue;
            }
            let v = fr[i * m.num_classes + j];
            let [r, g, b] = heat_rgb(v);
            let (x, y) = (left + j as f64 * cell, top + i as f64 * cell);
            s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{cell:.1}\" height=\"{cell:.1}\" fill=\"rgb({r},{g},{b})\" stroke=\"#ddd\" stroke-width=\"0.5\"><title>{} → {}: {count} ({:.0} %)</title></rect>\n",
                escape(class_names.get(i).map_or("", String::as_str)),
                escape(class_names.get(j).map_or("", String::as_str)),
                v * 100.0
            ));
            if show_counts {
                let ink = if v > 0.6 { "white" } else { "black" };
                s.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"{:.1}\" text-anchor=\"middle\" dominant-baseline=\"central\" fill=\"{ink}\">{count}</text>\n",
                    x + cell / 2.0,
                    y + cell / 2.0,
                    (cell * 0.42).min(12.0)
                ));
            }
        }
    }
    // Diagonal outline: the correct predictions.
    s.push_str(&format!(
        "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{grid:.1}\" height=\"{grid:.1}\" fill=\"none\" stroke=\"#888\" stroke-width=\"1\"/>\n"
    ));
    // Colour bar: fraction of the true class's images.
    s.push_str("<defs><linearGradient id=\"heat\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n");
    for k in 0..=10 {
        let v = k as f64 / 10.0;
        let [r, g, b] = heat_rgb(v);
        s.push_str(&format!(
            "<stop offset=\"{v:.1}\" stop-color=\"rgb({r},{g},{b})\"/>\n"
        ));
    }
    s.push_str("</linearGradient></defs>\n");
    let bar_h = grid.clamp(120.0, 400.0);
    s.push_str(&format!(
        "<rect x=\"{bar_x:.1}\" y=\"{top:.1}\" width=\"14\" height=\"{bar_h:.1}\" fill=\"url(#heat)\" stroke=\"#888\" stroke-width=\"0.5\"/>\n"
    ));
    for k in 0..=4 {
        let v = k as f64 / 4.0;
        let y = top + bar_h * (1.0 - v);
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{y:.1}\" font-size=\"10\" dominant-baseline=\"middle\">{:.0} %</text>\n",
            bar_x + 18.0,
            v * 100.0
        ));
    }
    s.push_str(&format!(
        "<text font-size=\"10\" text-anchor=\"middle\" transform=\"translate({:.1} {:.1}) rotate(-90)\">of the true class</text>\n",
        bar_x + 58.0,
        top + bar_h / 2.0
    ));
    s.push_str("</svg>\n");
    s
}

/// The row-normalised matrix as an unlabelled PNG thumbnail, `cell_px` per cell with a thin
/// grid (the SVG is the one to read).
pub fn png(m: &ConfusionMatrix, cell_px: u32) -> std::io::Result<Vec<u8>> {
    let c = m.num_classes as u32;
    let px = cell_px.max(1);
    let side = (c * px).max(1);
    let mut img = image::RgbImage::from_pixel(side, side, image::Rgb([255, 255, 255]));
    let fr = fractions(m);
    for i in 0..c {
        for j in 0..c {
            let color = image::Rgb(heat_rgb(fr[(i * c + j) as usize]));
            for y in 0..px {
                for x in 0..px {
                    let grid = px >= 4 && (x == 0 || y == 0);
                    let p = if grid {
                        image::Rgb([220, 220, 220])
                    } else {
                        color
                    };
                    img.put_pixel(j * px + x, i * px + y, p);
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(std::io::Error::other)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_names_both_axes_counts_and_the_colour_bar() {
        let names: Vec<String> = ["banded", "striped & <dotted>", "zigzagged"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = ConfusionMatrix::from_cells(
            3,
            &[(0, 0, 6), (0, 1, 2), (1, 1, 7), (2, 0, 1), (2, 2, 3)],
        );
        let s = svg(&m, &names, "capt on DTD (base)");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        // Every name twice (row and column label) plus tooltips; XML-escaped.
        assert!(s.matches(">banded</text>").count() == 2, "{s}");
        assert!(s.contains("striped &amp; &lt;dotted&gt;") && !s.contains("<dotted>"));
        assert!(s.contains("true class") && s.contains("predicted class"));
        assert!(s.contains("linearGradient") && s.contains("100 %"));
        // 3 classes: big cells, so the non-zero counts are printed.
        for k in [
            ">6</text>",
            ">2</text>",
            ">7</text>",
            ">1</text>",
            ">3</text>",
        ] {
            assert!(s.contains(k), "{k} missing");
        }
    }

    #[test]
    fn svg_of_many_classes_hides_counts_and_cuts_long_names() {
        let names: Vec<String> = (0..120)
            .map(|i| format!("class number {i} with a rather long descriptive name"))
            .collect();
        let mut m = ConfusionMatrix::new(120);
        for i in 0..120 {
            m.add(i, (i * 7) % 120);
        }
        let s = svg(&m, &names, "many");
        // One rect per non-empty cell, plus the outline and the colour bar.
        assert_eq!(s.matches("<rect x=").count(), 120 + 2);
        assert!(s.contains('…'));
        assert!(
            !s.contains("dominant-baseline=\"central\" fill"),
            "no counts at 9 px"
        );
    }

    #[test]
    fn png_thumbnail_is_row_normalised() {
        let m = ConfusionMatrix::from_cells(3, &[(0, 0, 2), (0, 1, 2), (2, 2, 1)]);
        let bytes = png(&m, 8).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (24, 24));
        // Row 1 is empty (white); row 0 splits 50/50 (coloured).
        assert_eq!(img.get_pixel(12, 12), &image::Rgb([255, 255, 255]));
        assert_ne!(img.get_pixel(4, 4), &image::Rgb([255, 255, 255]));
    }
}
