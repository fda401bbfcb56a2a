//! The live status page: one self-contained HTML document (inline CSS, JavaScript and SVG, no
//! external asset, so it works offline and behind any firewall) that renders the `/status`
//! document it is served with, then fetches it again every few seconds and redraws, without
//! reloading. The page lives in `status_page.html`; this file only embeds the document.

/// The page, with a placeholder where the status document goes.
const TEMPLATE: &str = include_str!("status_page.html");

/// Where the document goes: the body of a `<script type="application/json">` element.
const PLACEHOLDER: &str = "{{STATUS_JSON}}";

/// The page with `status` embedded, so it shows everything at once, before its first fetch.
pub(super) fn status_page(status: &serde_json::Value) -> String {
    TEMPLATE.replacen(PLACEHOLDER, &script_safe(&status.to_string()), 1)
}

/// JSON text that cannot end its `<script>` element or open a comment: `<`, `>` and `&` only
/// occur inside JSON strings, where their `\u` escapes mean the same.
fn script_safe(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_one_placeholder_and_no_external_asset() {
        assert_eq!(TEMPLATE.matches(PLACEHOLDER).count(), 1);
        for external in ["src=", "href=", "@import", "url(", "https://"] {
            assert!(!TEMPLATE.contains(external), "{external} in the page");
        }
        // The only URL is the SVG namespace, which is a name, never fetched.
        let svg_namespace = "http://www.w3.org/2000/svg";
        assert_eq!(
            TEMPLATE.matches("http://").count(),
            TEMPLATE.matches(svg_namespace).count()
        );
    }

    #[test]
    fn the_document_cannot_break_out_of_its_script_element() {
        let status =
            serde_json::json!({ "routes": [{ "prefix": "</script><script>alert(1)//&" }] });
        let page = status_page(&status);
        assert!(!page.contains("</script><script>alert"));
        let start = page.find("{\"routes\"").expect("embedded");
        let end = start + page[start..].find("</script>").expect("script end");
        let embedded: serde_json::Value =
            serde_json::from_str(&page[start..end]).expect("still JSON");
        assert_eq!(embedded, status);
    }
}
