//! JSON text exactly as Go's `encoding/json.Marshal` writes it (HTML-safe escaping), for the
//! JSON-valued `proxyMetadata` entries istioctl computes.

use std::collections::BTreeMap;

/// A JSON string literal as Go writes it: `<`, `>`, `&`, U+2028 and U+2029 become `\u00xx`
/// escapes, control characters use `\n`, `\r`, `\t`, `\b`, `\f` or `\u00xx`.
pub(crate) fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `map[string]string` as Go marshals it: keys in byte order.
pub(crate) fn string_map(map: &BTreeMap<String, String>) -> String {
    let body: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{}:{}", string(k), string(v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// Istio's `ISTIO_META_POD_PORTS` value: `[]model.PodPort` sorted by name, `name` omitted when
/// empty, `protocol` always empty.
pub(crate) fn pod_ports(ports: &BTreeMap<String, u32>) -> Option<String> {
    if ports.is_empty() {
        return None;
    }
    let items: Vec<String> = ports
        .iter()
        .map(|(name, port)| {
            let name = if name.is_empty() {
                String::new()
            } else {
                format!("\"name\":{},", string(name))
            };
            format!("{{{name}\"containerPort\":{port},\"protocol\":\"\"}}")
        })
        .collect();
    Some(format!("[{}]", items.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_go() {
        assert_eq!(string("a<b>&c"), r#""a\u003cb\u003e\u0026c""#);
        assert_eq!(
            string("q\"\\\n\t\u{1}\u{8}\u{c}\u{2028}é"),
            r#""q\"\\\n\t\u0001\b\f\u2028é""#
        );
    }

    #[test]
    fn pod_ports_match_istioctl() {
        let ports = BTreeMap::from([("HTTPS".to_string(), 443), ("HTTP".to_string(), 80)]);
        assert_eq!(
            pod_ports(&ports).as_deref(),
            Some(
                r#"[{"name":"HTTP","containerPort":80,"protocol":""},{"name":"HTTPS","containerPort":443,"protocol":""}]"#
            )
        );
        assert_eq!(pod_ports(&BTreeMap::new()), None);
    }

    #[test]
    fn string_maps_sort_keys_bytewise() {
        let m = BTreeMap::from([
            ("b".to_string(), "1".to_string()),
            ("B".to_string(), "<".to_string()),
        ]);
        assert_eq!(string_map(&m), r#"{"B":"\u003c","b":"1"}"#);
    }
}
