//! open_clip's text cleaning before BPE (`SimpleTokenizer` with `clean="lower"`):
//! `ftfy.fix_text`, `html.unescape` twice, whitespace collapse, lower case.
//!
//! ftfy is reproduced step by step (same order, repeated to a fixed point per line as ftfy does)
//! except `fix_encoding`, its heuristic mojibake repair ("cafÃ©" -> "café"), which is not
//! implemented: such text keeps its mojibake here.

use std::borrow::Cow;

use unicode_normalization::UnicodeNormalization;

/// Cleans `text` exactly as open_clip does before tokenizing (minus ftfy's mojibake repair).
pub fn clean_text(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    let words: Vec<&str> = unescaped
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .collect();
    words.join(" ").to_lowercase()
}

/// Python's `str.isspace`: Rust's White_Space plus the four ASCII separators U+1C..U+1F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `ftfy.fix_text` with its default config, without `fix_encoding`.
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // ftfy turns off HTML unescaping for good once a segment contains '<' (it looks like HTML).
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        text = text.chars().map(fix_c1_control).collect();
        text = text.chars().map(fix_latin_ligature).collect();
        text = text.chars().map(fix_character_width).collect();
        text = text.chars().map(uncurl_quote).collect();
        text = fix_line_breaks(&text);
        text = remove_terminal_escapes(&text);
        text.retain(|c| !is_removed_control(c));
        text = text.nfc().collect();
        if text == orig {
            return text;
        }
    }
}

/// Windows-1252 reading of C1 controls U+80..U+9F (bytes it leaves undefined stay as they are).
const CP1252_C1: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

fn fix_c1_control(c: char) -> char {
    match c as u32 {
        n @ 0x80..=0x9f => CP1252_C1[(n - 0x80) as usize],
        _ => c,
    }
}

/// ftfy's LIGATURES table: Latin typographic ligatures and legacy digraphs.
fn fix_latin_ligature(c: char) -> Cow<'static, str> {
    let s = match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return Cow::Owned(c.to_string()),
    };
    Cow::Borrowed(s)
}

/// ftfy's WIDTH_MAP: halfwidth/fullwidth forms U+FF01..U+FFEF to their NFKC form, U+3000 to ' '.
fn fix_character_width(c: char) -> Cow<'static, str> {
    match c as u32 {
        0x3000 => Cow::Borrowed(" "),
        0xff01..=0xffef => Cow::Owned(c.to_string().nfkc().collect()),
        _ => Cow::Owned(c.to_string()),
    }
}

fn uncurl_quote(c: char) -> char {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        _ => c,
    }
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

/// Drops ANSI escapes `ESC [ (digit|;)* letter`.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("\u{1b}[") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let params = after
            .find(|c: char| !(c.is_ascii_digit() || c == ';'))
            .unwrap_or(after.len());
        match after[params..].chars().next() {
            Some(c) if c.is_ascii_alphabetic() => rest = &after[params + 1..],
            _ => {
                out.push_str("\u{1b}[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// ftfy's CONTROL_CHARS: control characters it deletes.
fn is_removed_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

/// ftfy's `unescape_html`: `&#?[0-9A-Za-z]{1,24};` replaced when it is a known entity (also the
/// upper-cased form of a lower-case entity) or a numeric reference that decodes fully.
fn ftfy_unescape_html(text: &str) -> String {
    replace_refs(text, |s| {
        // `s` starts at '&'; find the `&#?[0-9A-Za-z]{1,24};` match, if any.
        let body_start = if s[1..].starts_with('#') { 2 } else { 1 };
        let len = s[body_start..]
            .bytes()
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        if len == 0 || len > 24 || s.as_bytes().get(body_start + len) != Some(&b';') {
            return None;
        }
        let m = &s[..body_start + len + 1];
        let replacement = if let Some(v) = entity(m) {
            v.to_string()
        } else if body_start == 2 {
            let u = html_unescape(m);
            if u.contains(';') {
                m.to_string()
            } else {
                u
            }
        } else {
            upper_entity(m).unwrap_or_else(|| m.to_string())
        };
        Some((m.len(), replacement))
    })
}

/// ftfy also decodes `&NTILDE;` as "Ñ": an all-caps spelling of a lower-case entity that HTML
/// itself does not decode.
fn upper_entity(m: &str) -> Option<String> {
    let lower = m.to_ascii_lowercase();
    if lower.to_ascii_uppercase() != m || html_unescape(m) != m {
        return None;
    }
    entity(&lower).map(str::to_uppercase)
}

fn entity(name: &str) -> Option<&'static str> {
    htmlize::ENTITIES
        .get(name.as_bytes())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Python's `html.unescape` (HTML5 character references, including the legacy names that need
/// no semicolon and the numeric-reference fix-ups).
pub(crate) fn html_unescape(text: &str) -> String {
    replace_refs(text, |s| {
        let b = s.as_bytes();
        if b.get(1) == Some(&b'#') {
            let hex = matches!(b.get(2), Some(b'x' | b'X'));
            let start = if hex { 3 } else { 2 };
            let digits = s[start..]
                .bytes()
                .take_while(|c| {
                    if hex {
                        c.is_ascii_hexdigit()
                    } else {
                        c.is_ascii_digit()
                    }
                })
                .count();
            if digits == 0 {
                return None;
            }
            let mut end = start + digits;
            if b.get(end) == Some(&b';') {
                end += 1;
            }
            let num = u32::from_str_radix(&s[start..start + digits], if hex { 16 } else { 10 })
                .unwrap_or(u32::MAX);
            return Some((end, numeric_ref(num)));
        }
        // Named: `[^\t\n\f <&#;]{1,32};?`, then the longest known prefix.
        let name_len = s[1..]
            .char_indices()
            .take_while(|&(_, c)| !matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';'))
            .take(32)
            .map(|(_, c)| c.len_utf8())
            .sum::<usize>();
        if name_len == 0 {
            return None;
        }
        let mut end = 1 + name_len;
        if b.get(end) == Some(&b';') {
            end += 1;
        }
        let reference = &s[..end];
        if let Some(v) = entity(reference) {
            return Some((end, v.to_string()));
        }
        // Python tries prefixes `s[:x]` for x from len-1 down to 2 (in characters, '&' excluded).
        let body = &reference[1..];
        let cuts: Vec<usize> = body.char_indices().map(|(i, _)| i).skip(2).collect();
        for &cut in cuts.iter().rev() {
            if let Some(v) = entity(&reference[..1 + cut]) {
                return Some((end, format!("{v}{}", &body[cut..])));
            }
        }
        Some((end, reference.to_string()))
    })
}

/// Python's handling of `&#N;`: the Windows-1252 fix-ups, U+FFFD for NUL, surrogates and
/// out-of-range values, and nothing for the code points HTML forbids.
fn numeric_ref(num: u32) -> String {
    match num {
        0x00 => "\u{fffd}".into(),
        0x0d => "\r".into(),
        0x80..=0x9f => CP1252_C1[(num - 0x80) as usize].to_string(),
        0xd800..=0xdfff | 0x11_0000.. => "\u{fffd}".into(),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
        n if n & 0xfffe == 0xfffe => String::new(),
        n => char::from_u32(n).map(String::from).unwrap_or_default(),
    }
}

/// Walks `text`, calling `at_amp` on every suffix starting with '&'; it returns how many bytes
/// it consumed and their replacement, or `None` to keep the '&'.
fn replace_refs(text: &str, at_amp: impl Fn(&str) -> Option<(usize, String)>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        match at_amp(tail) {
            Some((used, rep)) => {
                out.push_str(&rep);
                rest = &tail[used..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_matches_python() {
        // Expected values printed by Python 3.11's html.unescape.
        assert_eq!(html_unescape("fish &amp; chips"), "fish & chips");
        assert_eq!(html_unescape("&amp"), "&");
        assert_eq!(html_unescape("&ampfoo;"), "&foo;");
        assert_eq!(html_unescape("&notit;"), "¬it;");
        assert_eq!(html_unescape("&#39;&#x41;&#X42"), "'AB");
        assert_eq!(
            html_unescape("&#x80;&#0;&#1;&#xD800;&#99999999999;"),
            "€\u{fffd}\u{fffd}\u{fffd}"
        );
        assert_eq!(html_unescape("&unknown; & &# &#x;"), "&unknown; & &# &#x;");
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
    }

    #[test]
    fn ftfy_steps() {
        assert_eq!(fix_text("\u{201c}hi\u{2019}"), "\"hi'");
        assert_eq!(fix_text("\u{fb01}ne"), "fine");
        assert_eq!(fix_text("\u{ff21}\u{3000}\u{ff62}"), "A \u{300c}");
        assert_eq!(fix_text("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(fix_text("a\u{7}b\u{feff}"), "ab");
        assert_eq!(fix_text("e\u{301}"), "é");
        assert_eq!(fix_text("&amp;amp;amp;"), "&");
        assert_eq!(fix_text("<b> &amp;"), "<b> &amp;");
        assert_eq!(fix_text("&NTILDE;"), "Ñ");
        assert_eq!(fix_text("\u{93}x\u{94}"), "\"x\"");
    }

    #[test]
    fn clean_collapses_whitespace_and_lowercases() {
        assert_eq!(clean_text("  A\t\nB\u{a0}\u{1f}C  "), "a b c");
        assert_eq!(clean_text("ΟΔΟΣ"), "οδος");
        assert_eq!(clean_text(""), "");
    }
}
