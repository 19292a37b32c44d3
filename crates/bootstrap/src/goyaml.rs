//! YAML exactly as Istio's Go tools print it.
//!
//! `istioctl` writes `mesh.yaml` with `sigs.k8s.io/yaml`, which turns the value into JSON and
//! then prints it with go-yaml v2 (`go.yaml.in/yaml/v2`, a copy of libyaml's emitter). To match
//! its golden files byte for byte this module reproduces that emitter for JSON-shaped values:
//!
//! - mapping keys in go-yaml's "natural" order at every level (at the first differing
//!   character a non-letter sorts before a letter, runs of digits compare as numbers);
//! - block style with a 2-space indent; sequences inside a mapping are not indented
//!   (`- ` starts at the key's column); empty collections print as `{}` and `[]`;
//! - scalar styles chosen like go-yaml: a string that would read back as another type
//!   (`"true"`, `"8080"`, `""`, `"null"`, `"2001-12-14"`, ...) is double-quoted, a string that
//!   cannot be plain (`'{"a":1}'`, `': x'`, `' lead'`) is single-quoted, strings with
//!   control characters are double-quoted with escapes, strings with newlines use `|`;
//! - long plain and quoted strings are folded at spaces past column 80, as go-yaml v2.4
//!   does unless a program calls `yaml.FutureLineWrap()` (istioctl does not).
//!
//! Known, documented gaps: letters and digits outside ASCII are classified with Rust's
//! `char::is_alphabetic` / ASCII digits rather than Go's `unicode.IsLetter` / `IsDigit` when
//! ordering keys.

use std::cmp::Ordering;

use serde_json::{Number, Value};

const BEST_INDENT: i32 = 2;
const BEST_WIDTH: usize = 80;
/// Keys longer than this (in bytes) are written as complex keys (`? key`).
const MAX_SIMPLE_KEY: usize = 128;

/// Prints `value` as `sigs.k8s.io/yaml.Marshal` (go-yaml v2) would, ending with a newline.
pub fn marshal(value: &Value) -> String {
    let mut e = Emitter {
        out: Vec::new(),
        column: 0,
        whitespace: true,
        indention: true,
        indent: -1,
    };
    e.node(value, Ctx::ROOT);
    // DOCUMENT-END: go back to column 0.
    e.write_indent();
    // Only whole UTF-8 sequences from valid `str`s are ever copied, so this cannot fail.
    String::from_utf8(e.out).unwrap_or_default()
}

/// go-yaml v2's natural key order (`sorter.go`, `keyList.Less`) for string keys.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    if natural_less(a, b) {
        Ordering::Less
    } else if natural_less(b, a) {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

fn natural_less(a: &str, b: &str) -> bool {
    let ar: Vec<char> = a.chars().collect();
    let br: Vec<char> = b.chars().collect();
    let mut i = 0;
    while i < ar.len() && i < br.len() {
        if ar[i] == br[i] {
            i += 1;
            continue;
        }
        let al = ar[i].is_alphabetic();
        let bl = br[i].is_alphabetic();
        if al && bl {
            return ar[i] < br[i];
        }
        if al || bl {
            return bl;
        }
        let (mut an, mut bn) = (0i64, 0i64);
        if ar[i] == '0' || br[i] == '0' {
            let mut j = i;
            while j > 0 && ar[j - 1].is_ascii_digit() {
                j -= 1;
                if ar[j] != '0' {
                    an = 1;
                    bn = 1;
                    break;
                }
            }
        }
        let mut ai = i;
        while ai < ar.len() && ar[ai].is_ascii_digit() {
            an = an.wrapping_mul(10).wrapping_add(i64::from(ar[ai] as u8 - b'0'));
            ai += 1;
        }
        let mut bi = i;
        while bi < br.len() && br[bi].is_ascii_digit() {
            bn = bn.wrapping_mul(10).wrapping_add(i64::from(br[bi] as u8 - b'0'));
            bi += 1;
        }
        if an != bn {
            return an < bn;
        }
        if ai != bi {
            return ai < bi;
        }
        return ar[i] < br[i];
    }
    ar.len() < br.len()
}

/// Formats a JSON number the way it comes out of Go's JSON → go-yaml round trip:
/// integers as integers, other floats in `strconv.FormatFloat(f, 'g', -1, 64)` form.
pub fn format_number(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    // encoding/json writes integral floats below 1e21 without exponent or fraction; go-yaml
    // then reads them back as integers when they fit 64 bits.
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e21 {
        if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f) {
            return (f as i64).to_string();
        }
        if f > 0.0 && f < 18_446_744_073_709_551_616.0 {
            return (f as u64).to_string();
        }
    }
    go_format_g(f)
}

/// `strconv.FormatFloat(f, 'g', -1, 64)`.
fn go_format_g(f: f64) -> String {
    if f.is_nan() {
        return ".nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { ".inf".into() } else { "-.inf".into() };
    }
    let sci = format!("{:e}", f.abs()); // shortest round-trip digits, e.g. "1.2345e3"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let nd = digits.len() as i32;
    let dp = exp + 1;
    let mut out = String::new();
    if f.is_sign_negative() {
        out.push('-');
    }
    if !(-4..6).contains(&exp) {
        out.push(digits[0] as char);
        if nd > 1 {
            out.push('.');
            out.extend(digits[1..].iter().map(|&d| d as char));
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push('0');
        }
        out.push_str(&e.to_string());
        return out;
    }
    if dp > 0 {
        for k in 0..dp {
            out.push(digits.get(k as usize).map_or('0', |&d| d as char));
        }
    } else {
        out.push('0');
    }
    let prec = (nd - dp).max(0);
    if prec > 0 {
        out.push('.');
        for k in 1..=prec {
            let j = dp + k - 1;
            let c = if (0..nd).contains(&j) {
                digits[j as usize] as char
            } else {
                '0'
            };
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Which plain strings go-yaml would read back as something other than a string
// (`resolve.go`), and so must be quoted.

/// Whether go-yaml v2 marshals `s` with a double-quoted style request because, unquoted, it
/// would read back as a bool, null, number, timestamp, merge key or base-60 float.
pub fn needs_quotes(s: &str) -> bool {
    !resolves_to_str(s) || is_base60_float(s)
}

fn resolves_to_str(s: &str) -> bool {
    let Some(&first) = s.as_bytes().first() else {
        return false; // "" is null
    };
    const SPECIAL: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", "n", "N", "no", "No", "NO",
        "false", "False", "FALSE", "off", "Off", "OFF", "~", "null", "Null", "NULL", ".nan", ".NaN", ".NAN",
        ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF",
    ];
    match first {
        b'+'
        | b'-'
        | b'0'..=b'9'
        | b'y'
        | b'Y'
        | b'n'
        | b'N'
        | b't'
        | b'T'
        | b'f'
        | b'F'
        | b'o'
        | b'O'
        | b'~'
        | b'.' => {}
        _ => return true,
    }
    if SPECIAL.contains(&s) {
        return false;
    }
    match first {
        b'.' => !dot_float(s),
        b'+' | b'-' | b'0'..=b'9' => !(is_timestamp(s) || number_like(&s.replace('_', ""))),
        _ => true,
    }
}

/// `strconv.ParseFloat` succeeding on a string that starts with `.`.
fn dot_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 1;
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == start {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let es = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == es {
            return false;
        }
    }
    i == b.len() && s.parse::<f64>().is_ok_and(f64::is_finite)
}

/// The int / uint / float / binary / big-int branches of go-yaml's resolve for `plain`
/// (the string with underscores removed).
fn number_like(plain: &str) -> bool {
    match go_int(plain, true) {
        Some(IntParse::Fits64) => return true,
        Some(IntParse::TooBig) if !plain.starts_with(['+', '-']) => return true, // big.Int
        _ => {}
    }
    if yaml_style_float(plain) && plain.parse::<f64>().is_ok_and(f64::is_finite) {
        return true;
    }
    if let Some(rest) = plain.strip_prefix("0b") {
        let digits = rest.strip_prefix(['+', '-']).unwrap_or(rest);
        let ok = !digits.is_empty() && digits.bytes().all(|c| c == b'0' || c == b'1');
        let neg = rest.starts_with('-');
        if ok && (i64::from_str_radix(rest, 2).is_ok() || (!neg && u64::from_str_radix(rest, 2).is_ok())) {
            return true;
        }
    } else if let Some(rest) = plain.strip_prefix("-0b")
        && i64::from_str_radix(&format!("-{rest}"), 2).is_ok()
        && !rest.starts_with(['+', '-'])
    {
        return true;
    }
    false
}

enum IntParse {
    Fits64,
    TooBig,
}

/// Go's `strconv.ParseInt(s, 0, 64)` / `ParseUint(s, 0, 64)` syntax (base prefixes `0x`, `0o`,
/// `0b`, leading-zero octal): `None` for bad syntax, else whether the value fits i64 (or u64
/// when unsigned).
fn go_int(s: &str, signed: bool) -> Option<IntParse> {
    let (neg, body) = match s.as_bytes().first() {
        Some(b'+') if signed => (false, &s[1..]),
        Some(b'-') if signed => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = u128::from_str_radix(digits, radix).ok();
    let fits = match value {
        None => false,
        Some(v) if neg => v <= (i64::MAX as u128) + 1,
        Some(v) => v <= i64::MAX as u128 || (v <= u64::MAX as u128),
    };
    Some(if fits { IntParse::Fits64 } else { IntParse::TooBig })
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`
fn yaml_style_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let st = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - st
    };
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if i < b.len() && b[i] == b'.' {
            i += 1;
            digits(&mut i);
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$` (YAML 1.1 base-60 floats, quoted on output).
fn is_base60_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    if i >= b.len() || !b[i].is_ascii_digit() {
        return false;
    }
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let mut groups = 0;
    while i < b.len() && b[i] == b':' {
        i += 1;
        match (b.get(i), b.get(i + 1)) {
            (Some(d1), Some(d2)) if (b'0'..=b'5').contains(d1) && d2.is_ascii_digit() => i += 2,
            (Some(d1), _) if d1.is_ascii_digit() => i += 1,
            _ => return false,
        }
        groups += 1;
    }
    if groups == 0 {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
    }
    i == b.len()
}

/// go-yaml's timestamp check: `YYYY-` followed by one of the layouts it tries with `time.Parse`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    let year: i32 = s[..4].parse().unwrap_or(0);
    let mut p = Parser { b, i: 5 };
    let Some(month) = p.num() else { return false };
    if !(1..=12).contains(&month) || !p.lit(b'-') {
        return false;
    }
    let Some(day) = p.num() else { return false };
    if day < 1 || day > days_in(month, year) {
        return false;
    }
    if p.done() {
        return true; // "2006-1-2"
    }
    let zoned = match b[p.i] {
        b'T' | b't' => {
            p.i += 1;
            true
        }
        b' ' => {
            while p.i < b.len() && b[p.i] == b' ' {
                p.i += 1;
            }
            false
        }
        _ => return false,
    };
    let (Some(h), true, Some(m), true, Some(sec)) = (p.num(), p.lit(b':'), p.num(), p.lit(b':'), p.num())
    else {
        return false;
    };
    if h >= 24 || m >= 60 || sec >= 60 {
        return false;
    }
    if p.i + 1 < b.len() && (b[p.i] == b'.' || b[p.i] == b',') && b[p.i + 1].is_ascii_digit() {
        p.i += 1;
        while p.i < b.len() && b[p.i].is_ascii_digit() {
            p.i += 1;
        }
    }
    if !zoned {
        return p.done();
    }
    if p.lit(b'Z') {
        return p.done();
    }
    let rest = &b[p.i..];
    rest.len() == 6
        && (rest[0] == b'+' || rest[0] == b'-')
        && rest[1..3].iter().all(u8::is_ascii_digit)
        && rest[3] == b':'
        && rest[4..6].iter().all(u8::is_ascii_digit)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    /// Go's `getnum(s, false)`: one or two digits.
    fn num(&mut self) -> Option<u32> {
        let d1 = *self.b.get(self.i).filter(|c| c.is_ascii_digit())?;
        self.i += 1;
        let mut n = u32::from(d1 - b'0');
        if let Some(d2) = self.b.get(self.i).filter(|c| c.is_ascii_digit()) {
            n = n * 10 + u32::from(d2 - b'0');
            self.i += 1;
        }
        Some(n)
    }
    fn lit(&mut self, c: u8) -> bool {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn done(&self) -> bool {
        self.i == self.b.len()
    }
}

fn days_in(month: u32, year: i32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// ---------------------------------------------------------------------------------------------
// The emitter: a port of the parts of libyaml's emitter (go-yaml v2 `emitterc.go`) that block
// documents of JSON values reach. Flow collections only ever appear empty.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

#[derive(Clone, Copy)]
struct Ctx {
    mapping: bool,
    simple_key: bool,
}

impl Ctx {
    const ROOT: Ctx = Ctx {
        mapping: false,
        simple_key: false,
    };
    const SEQUENCE: Ctx = Ctx::ROOT;
    const KEY: Ctx = Ctx {
        mapping: true,
        simple_key: true,
    };
    const VALUE: Ctx = Ctx {
        mapping: true,
        simple_key: false,
    };
}

struct Analysis {
    multiline: bool,
    flow_plain_allowed: bool,
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
    block_allowed: bool,
}

struct Emitter {
    out: Vec<u8>,
    column: usize,
    whitespace: bool,
    indention: bool,
    indent: i32,
}

impl Emitter {
    fn node(&mut self, value: &Value, ctx: Ctx) {
        match value {
            Value::Object(map) if map.is_empty() => self.empty_flow(b"{", b"}"),
            Value::Array(items) if items.is_empty() => self.empty_flow(b"[", b"]"),
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| natural_cmp(a.0, b.0));
                self.block_mapping(&entries);
            }
            Value::Array(items) => self.block_sequence(items, ctx),
            Value::String(s) => {
                let requested = if s.contains('\n') {
                    Style::Literal
                } else if needs_quotes(s) {
                    Style::Double
                } else {
                    Style::Plain
                };
                self.scalar(s.as_bytes(), requested, ctx);
            }
            Value::Bool(b) => self.scalar(if *b { b"true" } else { b"false" }, Style::Plain, ctx),
            Value::Null => self.scalar(b"null", Style::Plain, ctx),
            Value::Number(n) => self.scalar(format_number(n).as_bytes(), Style::Plain, ctx),
        }
    }

    fn empty_flow(&mut self, open: &[u8], close: &[u8]) {
        self.write_indicator(open, true, true, false);
        self.write_indicator(close, false, false, false);
    }

    fn block_mapping(&mut self, entries: &[(&String, &Value)]) {
        let saved = self.indent;
        self.indent = if self.indent < 0 {
            0
        } else {
            self.indent + BEST_INDENT
        };
        for (key, value) in entries {
            self.write_indent();
            let a = analyze(key.as_bytes());
            if !a.multiline && key.len() <= MAX_SIMPLE_KEY {
                self.node(&Value::String((*key).clone()), Ctx::KEY);
                self.write_indicator(b":", false, false, false);
            } else {
                self.write_indicator(b"?", true, false, true);
                self.node(&Value::String((*key).clone()), Ctx::VALUE);
                self.write_indent();
                self.write_indicator(b":", true, false, true);
            }
            self.node(value, Ctx::VALUE);
        }
        self.indent = saved;
    }

    fn block_sequence(&mut self, items: &[Value], ctx: Ctx) {
        let indentless = ctx.mapping && !self.indention;
        let saved = self.indent;
        self.indent = if self.indent < 0 {
            0
        } else if indentless {
            self.indent
        } else {
            self.indent + BEST_INDENT
        };
        for item in items {
            self.write_indent();
            self.write_indicator(b"-", true, false, true);
            self.node(item, Ctx::SEQUENCE);
        }
        self.indent = saved;
    }

    fn scalar(&mut self, value: &[u8], requested: Style, ctx: Ctx) {
        let a = analyze(value);
        let mut style = requested;
        if ctx.simple_key && a.multiline {
            style = Style::Double;
        }
        if style == Style::Plain && (!a.block_plain_allowed || (value.is_empty() && ctx.simple_key)) {
            style = Style::Single;
        }
        let _ = a.flow_plain_allowed; // flow level is always 0 here
        if style == Style::Single && !a.single_quoted_allowed {
            style = Style::Double;
        }
        if style == Style::Literal && (!a.block_allowed || ctx.simple_key) {
            style = Style::Double;
        }
        let saved = self.indent;
        self.indent = if self.indent < 0 {
            BEST_INDENT
        } else {
            self.indent + BEST_INDENT
        };
        let allow_breaks = !ctx.simple_key;
        match style {
            Style::Plain => self.write_plain(value, allow_breaks),
            Style::Single => self.write_single_quoted(value, allow_breaks),
            Style::Double => self.write_double_quoted(value, allow_breaks),
            Style::Literal => self.write_literal(value),
        }
        self.indent = saved;
    }

    // -- output primitives ------------------------------------------------------------------

    fn put(&mut self, b: u8) {
        self.out.push(b);
        self.column += 1;
    }

    fn put_break(&mut self) {
        self.out.push(b'\n');
        self.column = 0;
    }

    fn write(&mut self, s: &[u8], i: &mut usize) {
        let w = width(s[*i]).max(1);
        self.out.extend_from_slice(&s[*i..(*i + w).min(s.len())]);
        self.column += 1;
        *i += w;
    }

    fn write_all(&mut self, s: &[u8]) {
        let mut i = 0;
        while i < s.len() {
            self.write(s, &mut i);
        }
    }

    fn write_break(&mut self, s: &[u8], i: &mut usize) {
        if s[*i] == b'\n' {
            self.put_break();
            *i += 1;
        } else {
            self.write(s, i);
            self.column = 0;
        }
    }

    fn write_indent(&mut self) {
        let indent = self.indent.max(0) as usize;
        if !self.indention || self.column > indent || (self.column == indent && !self.whitespace) {
            self.put_break();
        }
        while self.column < indent {
            self.put(b' ');
        }
        self.whitespace = true;
        self.indention = true;
    }

    fn write_indicator(&mut self, ind: &[u8], need_ws: bool, is_ws: bool, is_indention: bool) {
        if need_ws && !self.whitespace {
            self.put(b' ');
        }
        self.write_all(ind);
        self.whitespace = is_ws;
        self.indention = self.indention && is_indention;
    }

    fn write_plain(&mut self, value: &[u8], allow_breaks: bool) {
        if !self.whitespace {
            self.put(b' ');
        }
        let (mut spaces, mut breaks) = (false, false);
        let mut i = 0;
        while i < value.len() {
            if is_space(value, i) {
                if allow_breaks && !spaces && self.column > BEST_WIDTH && !is_space(value, i + 1) {
                    self.write_indent();
                    i += 1;
                } else {
                    self.write(value, &mut i);
                }
                spaces = true;
            } else if is_break(value, i) {
                if !breaks && value[i] == b'\n' {
                    self.put_break();
                }
                self.write_break(value, &mut i);
                self.indention = true;
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                self.write(value, &mut i);
                self.indention = false;
                spaces = false;
                breaks = false;
            }
        }
        self.whitespace = false;
        self.indention = false;
    }

    fn write_single_quoted(&mut self, value: &[u8], allow_breaks: bool) {
        self.write_indicator(b"'", true, false, false);
        let (mut spaces, mut breaks) = (false, false);
        let mut i = 0;
        while i < value.len() {
            if is_space(value, i) {
                if allow_breaks
                    && !spaces
                    && self.column > BEST_WIDTH
                    && i > 0
                    && i < value.len() - 1
                    && !is_space(value, i + 1)
                {
                    self.write_indent();
                    i += 1;
                } else {
                    self.write(value, &mut i);
                }
                spaces = true;
            } else if is_break(value, i) {
                if !breaks && value[i] == b'\n' {
                    self.put_break();
                }
                self.write_break(value, &mut i);
                self.indention = true;
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                if value[i] == b'\'' {
                    self.put(b'\'');
                }
                self.write(value, &mut i);
                self.indention = false;
                spaces = false;
                breaks = false;
            }
        }
        self.write_indicator(b"'", false, false, false);
        self.whitespace = false;
        self.indention = false;
    }

    fn write_double_quoted(&mut self, value: &[u8], allow_breaks: bool) {
        let mut spaces = false;
        self.write_indicator(b"\"", true, false, false);
        let mut i = 0;
        while i < value.len() {
            if !is_printable(value, i)
                || is_bom(value, i)
                || is_break(value, i)
                || value[i] == b'"'
                || value[i] == b'\\'
            {
                let w = width(value[i]).max(1);
                let ch = std::str::from_utf8(&value[i..(i + w).min(value.len())])
                    .ok()
                    .and_then(|s| s.chars().next())
                    .map_or(0, u32::from);
                i += w;
                self.put(b'\\');
                let short = match ch {
                    0x00 => Some(b'0'),
                    0x07 => Some(b'a'),
                    0x08 => Some(b'b'),
                    0x09 => Some(b't'),
                    0x0A => Some(b'n'),
                    0x0B => Some(b'v'),
                    0x0C => Some(b'f'),
                    0x0D => Some(b'r'),
                    0x1B => Some(b'e'),
                    0x22 => Some(b'"'),
                    0x5C => Some(b'\\'),
                    0x85 => Some(b'N'),
                    0xA0 => Some(b'_'),
                    0x2028 => Some(b'L'),
                    0x2029 => Some(b'P'),
                    _ => None,
                };
                match short {
                    Some(c) => self.put(c),
                    None => {
                        let (letter, digits) = if ch <= 0xFF {
                            (b'x', 2)
                        } else if ch <= 0xFFFF {
                            (b'u', 4)
                        } else {
                            (b'U', 8)
                        };
                        self.put(letter);
                        for k in (0..digits).rev() {
                            let d = ((ch >> (k * 4)) & 0x0F) as u8;
                            self.put(if d < 10 { b'0' + d } else { b'A' + d - 10 });
                        }
                    }
                }
                spaces = false;
            } else if is_space(value, i) {
                if allow_breaks && !spaces && self.column > BEST_WIDTH && i > 0 && i < value.len() - 1 {
                    self.write_indent();
                    if is_space(value, i + 1) {
                        self.put(b'\\');
                    }
                    i += 1;
                } else {
                    self.write(value, &mut i);
                }
                spaces = true;
            } else {
                self.write(value, &mut i);
                spaces = false;
            }
        }
        self.write_indicator(b"\"", false, false, false);
        self.whitespace = false;
        self.indention = false;
    }

    fn write_literal(&mut self, value: &[u8]) {
        self.write_indicator(b"|", true, false, false);
        // Block scalar hints: an explicit indent when the text starts with a space or break,
        // and the chomping indicator from the trailing line breaks.
        if is_space(value, 0) || is_break(value, 0) {
            self.write_indicator(&[b'0' + BEST_INDENT as u8], false, false, false);
        }
        let chomp = literal_chomp(value);
        if let Some(c) = chomp {
            self.write_indicator(&[c], false, false, false);
        }
        self.put_break();
        self.indention = true;
        self.whitespace = true;
        let mut breaks = true;
        let mut i = 0;
        while i < value.len() {
            if is_break(value, i) {
                self.write_break(value, &mut i);
                self.indention = true;
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                self.write(value, &mut i);
                self.indention = false;
                breaks = false;
            }
        }
    }
}

fn literal_chomp(value: &[u8]) -> Option<u8> {
    if value.is_empty() {
        return Some(b'-');
    }
    let mut i = value.len() - 1;
    while i > 0 && value[i] & 0xC0 == 0x80 {
        i -= 1;
    }
    if !is_break(value, i) {
        return Some(b'-');
    }
    if i == 0 {
        return Some(b'+');
    }
    i -= 1;
    while i > 0 && value[i] & 0xC0 == 0x80 {
        i -= 1;
    }
    if is_break(value, i) { Some(b'+') } else { None }
}

fn analyze(value: &[u8]) -> Analysis {
    if value.is_empty() {
        return Analysis {
            multiline: false,
            flow_plain_allowed: false,
            block_plain_allowed: true,
            single_quoted_allowed: true,
            block_allowed: false,
        };
    }
    let (mut block_ind, mut flow_ind) = (false, false);
    let (mut line_breaks, mut special) = (false, false);
    let (mut leading_space, mut leading_break, mut trailing_space, mut trailing_break) =
        (false, false, false, false);
    let (mut break_space, mut space_break) = (false, false);
    let (mut previous_space, mut previous_break) = (false, false);
    if value.starts_with(b"---") || value.starts_with(b"...") {
        block_ind = true;
        flow_ind = true;
    }
    let mut preceded_by_ws = true;
    let mut i = 0;
    while i < value.len() {
        let w = width(value[i]).max(1);
        let followed_by_ws = i + w >= value.len() || is_blank(value, i + w);
        if i == 0 {
            match value[i] {
                b'#' | b',' | b'[' | b']' | b'{' | b'}' | b'&' | b'*' | b'!' | b'|' | b'>' | b'\'' | b'"'
                | b'%' | b'@' | b'`' => {
                    flow_ind = true;
                    block_ind = true;
                }
                b'?' | b':' => {
                    flow_ind = true;
                    if followed_by_ws {
                        block_ind = true;
                    }
                }
                b'-' if followed_by_ws => {
                    flow_ind = true;
                    block_ind = true;
                }
                _ => {}
            }
        } else {
            match value[i] {
                b',' | b'?' | b'[' | b']' | b'{' | b'}' => flow_ind = true,
                b':' => {
                    flow_ind = true;
                    if followed_by_ws {
                        block_ind = true;
                    }
                }
                b'#' if preceded_by_ws => {
                    flow_ind = true;
                    block_ind = true;
                }
                _ => {}
            }
        }
        if !is_printable(value, i) {
            special = true;
        }
        if is_space(value, i) {
            if i == 0 {
                leading_space = true;
            }
            if i + w == value.len() {
                trailing_space = true;
            }
            if previous_break {
                break_space = true;
            }
            previous_space = true;
            previous_break = false;
        } else if is_break(value, i) {
            line_breaks = true;
            if i == 0 {
                leading_break = true;
            }
            if i + w == value.len() {
                trailing_break = true;
            }
            if previous_space {
                space_break = true;
            }
            previous_space = false;
            previous_break = true;
        } else {
            previous_space = false;
            previous_break = false;
        }
        preceded_by_ws = is_blankz(value, i);
        i += w;
    }
    let mut a = Analysis {
        multiline: line_breaks,
        flow_plain_allowed: true,
        block_plain_allowed: true,
        single_quoted_allowed: true,
        block_allowed: true,
    };
    if leading_space || leading_break || trailing_space || trailing_break {
        a.flow_plain_allowed = false;
        a.block_plain_allowed = false;
    }
    if trailing_space {
        a.block_allowed = false;
    }
    if break_space {
        a.flow_plain_allowed = false;
        a.block_plain_allowed = false;
        a.single_quoted_allowed = false;
    }
    if space_break || special {
        a.flow_plain_allowed = false;
        a.block_plain_allowed = false;
        a.single_quoted_allowed = false;
        a.block_allowed = false;
    }
    if line_breaks {
        a.flow_plain_allowed = false;
        a.block_plain_allowed = false;
    }
    if flow_ind {
        a.flow_plain_allowed = false;
    }
    if block_ind {
        a.block_plain_allowed = false;
    }
    a
}

fn at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

fn width(b: u8) -> usize {
    if b & 0x80 == 0 {
        1
    } else if b & 0xE0 == 0xC0 {
        2
    } else if b & 0xF0 == 0xE0 {
        3
    } else if b & 0xF8 == 0xF0 {
        4
    } else {
        0
    }
}

fn is_space(s: &[u8], i: usize) -> bool {
    at(s, i) == b' '
}

fn is_blank(s: &[u8], i: usize) -> bool {
    matches!(at(s, i), b' ' | b'\t')
}

fn is_break(s: &[u8], i: usize) -> bool {
    match at(s, i) {
        b'\r' | b'\n' => true,
        0xC2 => at(s, i + 1) == 0x85,
        0xE2 => at(s, i + 1) == 0x80 && matches!(at(s, i + 2), 0xA8 | 0xA9),
        _ => false,
    }
}

fn is_blankz(s: &[u8], i: usize) -> bool {
    is_blank(s, i) || is_break(s, i) || at(s, i) == 0
}

fn is_bom(s: &[u8], i: usize) -> bool {
    at(s, i) == 0xEF && at(s, i + 1) == 0xBB && at(s, i + 2) == 0xBF
}

fn is_printable(s: &[u8], i: usize) -> bool {
    let b = at(s, i);
    let b1 = at(s, i + 1);
    let b2 = at(s, i + 2);
    b == 0x0A
        || (0x20..=0x7E).contains(&b)
        || (b == 0xC2 && b1 >= 0xA0)
        || (b > 0xC2 && b < 0xED)
        || (b == 0xED && b1 < 0xA0)
        || b == 0xEE
        || (b == 0xEF && !(b1 == 0xBB && b2 == 0xBF) && !(b1 == 0xBF && (b2 == 0xBE || b2 == 0xBF)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn val(v: &str) -> String {
        marshal(&json!({ "k": v }))
    }

    #[test]
    fn strings_that_read_back_as_other_types_are_double_quoted() {
        for s in [
            "true",
            "false",
            "True",
            "FALSE",
            "yes",
            "no",
            "y",
            "N",
            "on",
            "Off",
            "~",
            "null",
            "NULL",
            "",
            "8080",
            "-1",
            "+5",
            "0x1F",
            "0o17",
            "017",
            "0b101",
            "1_000",
            "1.5",
            ".5",
            "1e3",
            "1E+3",
            "-.inf",
            ".NaN",
            "1__",
            "2001-12-14",
            "2001-12-14T21:59:43.10Z",
            "2001-12-14 21:59:43.10",
            "2020-1-2t3:04:05+01:00",
            "190:20:30",
            "1:20",
            "99999999999999999999999",
            "0xFFFFFFFFFFFFFFFFFFFF",
            "089",
        ] {
            assert_eq!(val(s), format!("k: \"{s}\"\n"), "for {s:?}");
        }
    }

    #[test]
    fn ordinary_strings_stay_plain() {
        for s in [
            "latest",
            "foo",
            "istiod-rev-1.istio-system.svc:15012",
            "10.10.10.10",
            "fd00:10:96::1",
            "a:b",
            "Yes please",
            "nope",
            "1.2.3",
            "2001-13-01",
            "2001-02-30",
            "0x",
            "0b",
            "1:60",
            "+",
            "a#b",
            "http://x/y?z",
            ".",
            "..",
            "-0b",
            "<<",
        ] {
            assert_eq!(val(s), format!("k: {s}\n"), "for {s:?}");
        }
    }

    #[test]
    fn strings_that_cannot_be_plain_are_single_quoted() {
        assert_eq!(val(r#"{"a":"b"}"#), "k: '{\"a\":\"b\"}'\n");
        assert_eq!(val("[1]"), "k: '[1]'\n");
        assert_eq!(val("a: b"), "k: 'a: b'\n");
        assert_eq!(val("a #b"), "k: 'a #b'\n");
        assert_eq!(val("#x"), "k: '#x'\n");
        assert_eq!(val(" lead"), "k: ' lead'\n");
        assert_eq!(val("trail "), "k: 'trail '\n");
        assert_eq!(val("- x"), "k: '- x'\n");
        assert_eq!(val("-x"), "k: -x\n");
        assert_eq!(val(":x"), "k: :x\n");
        assert_eq!(val("? x"), "k: '? x'\n");
        assert_eq!(val("*alias"), "k: '*alias'\n");
        assert_eq!(val("&a"), "k: '&a'\n");
        assert_eq!(val("!tag"), "k: '!tag'\n");
        assert_eq!(val("%p"), "k: '%p'\n");
        assert_eq!(val("@at"), "k: '@at'\n");
        assert_eq!(val("`b"), "k: '`b'\n");
        assert_eq!(val("it's"), "k: it's\n");
        assert_eq!(val("'q'"), "k: '''q'''\n");
        assert_eq!(val("---"), "k: '---'\n");
        assert_eq!(val("a,b"), "k: a,b\n");
        assert_eq!(val("-"), "k: '-'\n");
        assert_eq!(val("12:"), "k: '12:'\n");
    }

    #[test]
    fn control_characters_are_escaped_in_double_quotes() {
        assert_eq!(val("a\tb"), "k: \"a\\tb\"\n");
        assert_eq!(val("a\u{1}b"), "k: \"a\\x01b\"\n");
        assert_eq!(val("bell\u{7}"), "k: \"bell\\a\"\n");
        assert_eq!(val("smile 😀"), "k: \"smile \\U0001F600\"\n");
        assert_eq!(val("caf\u{e9}"), "k: caf\u{e9}\n");
        assert_eq!(val("\u{feff}x"), "k: \"\\uFEFFx\"\n");
        assert_eq!(val("a\"b"), "k: a\"b\n");
        assert_eq!(val("\"a\tb\\"), "k: \"\\\"a\\tb\\\\\"\n");
    }

    #[test]
    fn multi_line_strings_use_literal_blocks() {
        assert_eq!(val("a\nb"), "k: |-\n  a\n  b\n");
        assert_eq!(val("a\nb\n"), "k: |\n  a\n  b\n");
        assert_eq!(val("a\n\n"), "k: |+\n  a\n\n");
        assert_eq!(val(" a\nb"), "k: |2-\n   a\n  b\n");
        assert_eq!(val("a\n\nb"), "k: |-\n  a\n\n  b\n");
        // trailing space or space before a break: not allowed as a block, so double-quoted
        assert_eq!(val("a \nb"), "k: \"a \\nb\"\n");
        let nested = marshal(&json!({"a": {"b": "x\ny"}, "c": 1}));
        assert_eq!(nested, "a:\n  b: |-\n    x\n    y\nc: 1\n");
    }

    #[test]
    fn long_strings_fold_at_spaces_after_column_80() {
        let words = vec!["word"; 30].join(" ");
        let out = val(&words);
        let expected_first = format!("k: {}", vec!["word"; 16].join(" "));
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(expected_first.as_str()));
        assert_eq!(
            lines.next(),
            Some(format!("  {}", vec!["word"; 14].join(" ")).as_str())
        );
        assert_eq!(lines.next(), None);
        // no spaces: never folded
        let long = "x".repeat(200);
        assert_eq!(val(&long), format!("k: {long}\n"));
        // single-quoted folds the same way
        let quoted = format!("{{ {words}");
        assert!(val(&quoted).starts_with("k: '{ word"));
        assert_eq!(val(&quoted).lines().count(), 2);
    }

    #[test]
    fn keys_use_natural_order_at_every_level() {
        let v = json!({
            "ISTIO_METAJSON_LABELS": "x", "ISTIO_META_WORKLOAD_NAME": "y", "b": {"z": 1, "a10": 1, "a9": 1, "A": 1},
            "a": [ {"y": 1, "x": 2} ], "_u": 1, "1": 1
        });
        assert_eq!(
            marshal(&v),
            "_u: 1\n\"1\": 1\nISTIO_META_WORKLOAD_NAME: \"y\"\nISTIO_METAJSON_LABELS: x\na:\n- x: 2\n  \"y\": 1\nb:\n  A: 1\n  a9: 1\n  a10: 1\n  z: 1\n"
        );
        assert_eq!(natural_cmp("a01", "a1"), Ordering::Greater);
        assert_eq!(natural_cmp("a1", "a01"), Ordering::Less);
        assert_eq!(natural_cmp("ab", "a"), Ordering::Greater);
        assert_eq!(natural_cmp("a_b", "aB"), Ordering::Less);
    }

    #[test]
    fn collections_and_scalars() {
        let v = json!({
            "empty_map": {}, "empty_list": [], "list": ["a", 1, true, null, ["x"], {}],
            "f": 0.5, "big": 1.0e21, "small": 0.00001, "neg": -3, "e6": 1234567.5, "int_float": 8080.0
        });
        assert_eq!(
            marshal(&v),
            "big: 1e+21\ne6: 1.2345675e+06\nempty_list: []\nempty_map: {}\nf: 0.5\nint_float: 8080\nlist:\n- a\n- 1\n- true\n- null\n- - x\n- {}\nneg: -3\nsmall: 1e-05\n"
        );
        assert_eq!(marshal(&json!({})), "{}\n");
        assert_eq!(marshal(&json!({"": "v"})), "\"\": v\n");
    }

    #[test]
    fn very_long_keys_become_complex_keys() {
        let key = "k".repeat(129);
        assert_eq!(marshal(&json!({ key.clone(): "v" })), format!("? {key}\n: v\n"));
    }
}
