//! `cluster.env`, both ways: [`render`] writes it as istioctl does, [`parse`] reads it as the
//! sidecar package's `istio-start.sh` does (`set -a; . cluster.env`).
//!
//! The file is shell: one `KEY=VALUE` assignment a line, values quoted by [`quote`]
//! (istioctl's `shellescape.Quote`). The two halves live together so that what one writes
//! the other reads back (the round-trip test below).

use std::collections::BTreeMap;

use crate::Error;

/// Renders `vars` as `cluster.env`: `KEY=<quoted value>` lines, sorted as istioctl sorts
/// them, newline-terminated. A key that is not a shell variable name is an
/// [`Error::BadEnvKey`].
pub fn render(vars: &BTreeMap<String, String>) -> Result<String, Error> {
    let mut lines = Vec::with_capacity(vars.len());
    for (key, value) in vars {
        if !is_name(key) {
            return Err(Error::BadEnvKey { key: key.clone() });
        }
        lines.push(format!("{key}={}", quote(value)));
    }
    // istioctl sorts whole `KEY=value` lines, which is not the same as sorting keys
    // (`A_B=` vs `A=`).
    lines.sort();
    Ok(lines.join("\n") + "\n")
}

/// Quotes a value for `cluster.env` exactly as istioctl's `shellescape.Quote`: empty is `''`;
/// a value made only of `\`, `w`, `@`, `%`, `+`, `=`, `:`, `,`, `.`, `/` and `-` is left bare
/// (istioctl's regex escapes `\w` twice, so letters and digits are *not* safe); anything
/// else is single-quoted with `'` written as `'"'"'`.
///
/// The quirk has one lossy case, kept for byte-for-byte compatibility: a bare value with a
/// `\` loses it when the shell (and [`parse`]) reads the file back.
pub fn quote(value: &str) -> String {
    if value.is_empty() {
        return "''".into();
    }
    let safe = |c: char| {
        matches!(
            c,
            '\\' | 'w' | '@' | '%' | '+' | '=' | ':' | ',' | '.' | '/' | '-'
        )
    };
    if value.chars().all(safe) {
        return value.to_string();
    }
    format!("'{}'", value.replace('\'', "'\"'\"'"))
}

/// Whether `key` is a shell variable name: letters, digits and `_`, not starting with a digit.
pub fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A `cluster.env` line the shell would not read as a plain assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SyntaxError {
    /// 1-based line where the assignment starts.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses shell `KEY=VALUE` assignments: single-quoted values (with `'"'"'` for a quote),
/// double-quoted values (`\"`, `\\`, `\$`, `` \` `` escapes), bare values, `export `
/// prefixes, blank lines and `#` comments. No expansion is done: a `$` or `` ` `` outside
/// single quotes is refused. Later assignments win, as in the shell; the order is that of
/// each key's last assignment.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, SyntaxError> {
    let chars: Vec<char> = text.chars().collect();
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let n = chars.len();
    let err = |line: usize, message: String| SyntaxError { line, message };
    while i < n {
        // Skip blank space and comments between assignments.
        match chars[i] {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            ' ' | '\t' | '\r' | ';' => {
                i += 1;
                continue;
            }
            '#' => {
                while i < n && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let start_line = line;
        let mut key = String::new();
        while i < n && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            key.push(chars[i]);
            i += 1;
        }
        if key == "export" && i < n && (chars[i] == ' ' || chars[i] == '\t') {
            continue;
        }
        if key.is_empty() || key.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(err(
                start_line,
                "expected KEY=VALUE with KEY made of letters, digits and '_'".into(),
            ));
        }
        if i >= n || chars[i] != '=' {
            return Err(err(start_line, format!("expected '=' after {key}")));
        }
        i += 1;
        let mut value = String::new();
        while i < n {
            match chars[i] {
                ' ' | '\t' | '\r' | '\n' | ';' => break,
                '\'' => {
                    i += 1;
                    loop {
                        if i >= n {
                            return Err(err(start_line, format!("{key}: unterminated single quote")));
                        }
                        if chars[i] == '\'' {
                            i += 1;
                            break;
                        }
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        value.push(chars[i]);
                        i += 1;
                    }
                }
                '"' => {
                    i += 1;
                    loop {
                        if i >= n {
                            return Err(err(start_line, format!("{key}: unterminated double quote")));
                        }
                        match chars[i] {
                            '"' => {
                                i += 1;
                                break;
                            }
                            '\\' if i + 1 < n && matches!(chars[i + 1], '"' | '\\' | '$' | '`') => {
                                value.push(chars[i + 1]);
                                i += 2;
                            }
                            '\\' if i + 1 < n && chars[i + 1] == '\n' => {
                                line += 1;
                                i += 2;
                            }
                            '$' | '`' => {
                                return Err(err(
                                    start_line,
                                    format!(
                                        "{key}: expansions ($, `) are not supported; quote the value with '…'"
                                    ),
                                ));
                            }
                            c => {
                                if c == '\n' {
                                    line += 1;
                                }
                                value.push(c);
                                i += 1;
                            }
                        }
                    }
                }
                '\\' => {
                    if i + 1 < n && chars[i + 1] == '\n' {
                        line += 1;
                    } else if i + 1 < n {
                        value.push(chars[i + 1]);
                    }
                    i += 2;
                }
                '$' | '`' => {
                    return Err(err(
                        start_line,
                        format!("{key}: expansions ($, `) are not supported; quote the value with '…'"),
                    ));
                }
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        // Later assignments win, as in the shell.
        vars.retain(|(k, _)| *k != key);
        vars.push((key, value));
        // Anything after whitespace on the same line must be a comment or another assignment.
        while i < n && (chars[i] == ' ' || chars[i] == '\t' || chars[i] == '\r') {
            i += 1;
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_reproduces_istioctl_quirk() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("latest"), "'latest'");
        assert_eq!(quote("10.10.10.10"), "'10.10.10.10'");
        assert_eq!(quote("w"), "w");
        assert_eq!(quote("@%+=:,./-\\w"), "@%+=:,./-\\w");
        assert_eq!(quote("it's"), "'it'\"'\"'s'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn env_names() {
        assert!(is_name("ISTIO_META_X"));
        assert!(is_name("_a1"));
        assert!(!is_name("1A"));
        assert!(!is_name("A-B"));
        assert!(!is_name("$(x)"));
        assert!(!is_name(""));
    }

    #[test]
    fn parses_istioctl_cluster_env() {
        let text = "CANONICAL_REVISION='latest'
ISTIO_INBOUND_PORTS='*'
ISTIO_METAJSON_LABELS='{\"service.istio.io/canonical-name\":\"foo\"}'
ISTIO_META_MESH_ID=''
ISTIO_SVC_IP=10.10.10.10
QUOTE='it'\"'\"'s'
export EXPORTED=yes
# a comment
DOUBLE=\"a \\\"b\\\" c\"  # trailing comment
MULTI='line one
line two'
ISTIO_INBOUND_PORTS='8080'
";
        let vars = parse(text).expect("parse");
        let get = |k: &str| vars.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CANONICAL_REVISION"), Some("latest"));
        assert_eq!(
            get("ISTIO_METAJSON_LABELS"),
            Some("{\"service.istio.io/canonical-name\":\"foo\"}")
        );
        assert_eq!(get("ISTIO_META_MESH_ID"), Some(""));
        assert_eq!(get("ISTIO_SVC_IP"), Some("10.10.10.10"));
        assert_eq!(get("QUOTE"), Some("it's"));
        assert_eq!(get("EXPORTED"), Some("yes"));
        assert_eq!(get("DOUBLE"), Some("a \"b\" c"));
        assert_eq!(get("MULTI"), Some("line one\nline two"));
        assert_eq!(get("ISTIO_INBOUND_PORTS"), Some("8080"), "later assignment wins");
        assert_eq!(vars.len(), 9);
    }

    #[test]
    fn refuses_malformed_env() {
        assert_eq!(parse("A=1\nB='open\n").unwrap_err().line, 2);
        assert!(parse("A=1\n=x\n").unwrap_err().message.contains("KEY=VALUE"));
        assert!(parse("1A=x\n").is_err());
        assert!(parse("NOEQ\n").unwrap_err().message.contains("'='"));
        assert!(parse("A=$HOME\n").unwrap_err().message.contains("expansions"));
    }

    #[test]
    fn what_render_writes_parse_reads_back() {
        let vars: BTreeMap<String, String> = [
            ("EMPTY", ""),
            ("SPACES", "  two  spaces  "),
            ("SINGLE", "it's 'quoted'"),
            ("DOUBLE", "say \"hi\""),
            ("EQUALS", "a=b=c"),
            ("BARE_EQUALS", "=:,./-@%+"),
            ("JSON", "{\"app\":\"ratings\",\"x\":\"it's\"}"),
            ("SHELL", "$(rm -rf /) `id` $HOME ; # not a comment"),
            ("MULTI", "line one\nline two\n"),
            ("TABS", "a\tb"),
            ("UNICODE", "zürich ✓"),
            ("ISTIO_META_A_B", "x"),
            ("ISTIO_META_A", "y"),
            ("w", "w"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let text = render(&vars).expect("render");
        let parsed: BTreeMap<String, String> = parse(&text).expect("parse").into_iter().collect();
        assert_eq!(parsed, vars, "{text}");

        // istioctl's one lossy case: a bare value keeps its `\`, which the shell then eats.
        let lossy = BTreeMap::from([("P".to_owned(), "w\\=".to_owned())]);
        let text = render(&lossy).expect("render");
        assert_eq!(text, "P=w\\=\n");
        assert_eq!(parse(&text).expect("parse"), [("P".to_owned(), "w=".to_owned())]);
    }

    #[test]
    fn render_refuses_keys_the_shell_cannot_assign() {
        let vars = BTreeMap::from([("A-B".to_owned(), "x".to_owned())]);
        assert!(matches!(render(&vars), Err(Error::BadEnvKey { key }) if key == "A-B"));
    }
}
