//! Text from elsewhere made safe to print.
//!
//! Errors, warnings, tracker names and versions reach the admin's terminal from
//! agents and nodes, which may be hostile: an escape sequence in a "warning" could
//! rewrite the screen or the window title. Everything printed that another process
//! chose goes through [`escape`], which leaves printable text (any script) alone and
//! writes control characters as `\n`, `\x1b`, `\u{202e}` and so on.

/// `s` with every control character (C0, DEL, C1) and the Unicode bidirectional
/// and invisible formatting characters written as escapes; printable text is kept.
pub fn escape(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// [`escape`], cut to at most `max` characters of the original (with `…`).
pub fn escape_short(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", escape(&s[..at])),
        None => escape(s),
    }
}

/// How to name one character in an error: `'/'`, `NUL`, `an escape (\x1b)`.
pub fn describe_char(c: char) -> String {
    match c {
        '\0' => "NUL".into(),
        '\x1b' => "an escape character (\\x1b)".into(),
        ' ' => "a space".into(),
        c if needs_escape(c) => {
            let mut s = String::from("the control character ");
            push_escaped(&mut s, c);
            s
        }
        c => format!("'{c}'"),
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            // Bidirectional overrides and isolates, which reorder what follows.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
            // Zero-width and invisible formatting characters.
            | '\u{200b}'..='\u{200d}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

fn push_escaped(out: &mut String, c: char) {
    use std::fmt::Write;
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_text_is_kept() {
        assert_eq!(escape("plain text, ünïcode ✓"), "plain text, ünïcode ✓");
        assert_eq!(escape("a\x1b]0;owned\x07b\nc"), "a\\x1b]0;owned\\x07b\\nc");
        assert_eq!(escape("x\u{202e}y\u{9b}z"), "x\\u{202e}y\\x9bz");
        assert_eq!(escape("\0"), "\\x00");
    }

    #[test]
    fn short_forms() {
        assert_eq!(escape_short("abcdef", 3), "abc…");
        assert_eq!(escape_short("ab", 3), "ab");
        assert_eq!(describe_char('/'), "'/'");
        assert_eq!(describe_char('\0'), "NUL");
        assert!(describe_char('\x1b').contains("escape"));
    }
}
