//! TOML diagnostics: every configuration error of both daemons names the
//! file, the line and the field, because operators edit these files by hand
//! and a bad one must be fixable from the message alone. These helpers map
//! spans (byte offsets) and parser errors to lines and field names; each
//! daemon's error enum carries the result.

use std::ops::Range;

/// Where a configuration problem is: 1-based line (0 when the parser gave
/// no position), the field it concerns, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key of a `key = value` line (quotes removed), or `None` for a table
/// header or a line without `=`.
pub fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    l.split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty() && !k.starts_with('['))
}

/// The field a serde message names itself: "missing field `x`",
/// "unknown field `x`, expected …".
pub fn field_named_in(message: &str) -> Option<String> {
    if !message.contains("field") {
        return None;
    }
    message.split('`').nth(1).map(str::to_owned)
}

/// The field of a "missing field `x`" message.
pub fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Best effort `table.key` for a byte offset: the key on that line, prefixed
/// by the nearest table header above it; a span covering a whole table
/// (e.g. a missing field) gives the table's name.
pub fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim().to_owned());
    let header = |l: &str| {
        l.trim()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .map(|t| t.trim_matches(['[', ']']).trim().to_owned())
    };
    let table = text[..line_start].lines().rev().find_map(header);
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (_, None) => header(line),
    }
}

/// 1-based line of `key = …`, inside `[section]` when one is named (a key
/// such as `url` appears in several sections); 0 when absent.
pub fn line_of_key(text: &str, section: Option<&str>, key: &str) -> usize {
    let header = section.map(|s| format!("[{s}]"));
    let mut inside = header.is_none();
    text.lines()
        .position(|l| {
            let t = l.trim();
            if let Some(h) = &header {
                if t.starts_with('[') {
                    inside = t == h;
                    return false;
                }
            }
            inside
                && t.split_once('=')
                    .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        })
        .map_or(0, |i| i + 1)
}

/// A toml/serde error located: the line from its span; the field from the
/// message (serde names unknown and missing fields) or from the
/// `key = value` line the span points at, else `"?"`.
pub fn parse_error(text: &str, e: &toml::de::Error) -> Located {
    let message = e.message().trim().to_owned();
    let (line, from_line) = match e.span() {
        Some(span) => {
            let line = line_of(text, span.start);
            (line, key_on_line(text, line))
        }
        None => (0, None),
    };
    Located {
        line,
        field: field_named_in(&message)
            .or(from_line)
            .unwrap_or_else(|| "?".to_owned()),
        message,
    }
}

/// A problem with the value at `span`.
pub fn at_span(text: &str, span: Range<usize>, field: &str, message: impl Into<String>) -> Located {
    Located {
        line: line_of(text, span.start),
        field: field.to_owned(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "a = 1\n[broker]\nurl = \"x\"\n[store]\nurl = 2\n";

    #[test]
    fn lines_keys_and_tables_are_found() {
        assert_eq!(line_of(DOC, 0), 1);
        assert_eq!(line_of(DOC, DOC.find("url = 2").unwrap()), 5);
        assert_eq!(line_of(DOC, usize::MAX), 6);
        assert_eq!(key_on_line(DOC, 3).as_deref(), Some("url"));
        assert_eq!(key_on_line(DOC, 2), None);
        assert_eq!(key_on_line(DOC, 0), None);
        assert_eq!(
            field_at(DOC, DOC.find("url = 2").unwrap()).as_deref(),
            Some("store.url")
        );
        assert_eq!(field_at(DOC, 0).as_deref(), Some("a"));
        assert_eq!(line_of_key(DOC, Some("store"), "url"), 5);
        assert_eq!(line_of_key(DOC, None, "url"), 3);
        assert_eq!(line_of_key(DOC, Some("nope"), "url"), 0);
    }

    #[test]
    fn serde_messages_name_their_field() {
        assert_eq!(
            field_named_in("missing field `port`").as_deref(),
            Some("port")
        );
        assert_eq!(
            field_named_in("unknown field `prot`, expected one of `port`").as_deref(),
            Some("prot")
        );
        assert_eq!(field_named_in("invalid type: `x`"), None);
        assert_eq!(
            missing_field("missing field `port`").as_deref(),
            Some("port")
        );
        assert_eq!(missing_field("unknown field `port`"), None);
    }

    #[test]
    fn parser_errors_are_located_on_their_line() {
        let text = "a = 1\nb = = 2\n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        let at = parse_error(text, &e);
        assert_eq!(at.line, 2);
        assert_eq!(at.field, "b");
        assert!(!at.message.is_empty());
    }
}
