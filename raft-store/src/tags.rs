//! Kong's `?tags=` list filter (kong/api/endpoints.lua, kong/db/dao/init.lua): `a,b`
//! keeps the entities that carry every tag, `a/b` those that carry any; at most
//! [`FILTER_TAGS_MAX`] tags, each of printable ASCII but `,` and `/`, or UTF-8.

use serde_json::Value;

use crate::error::ApiError;
use crate::schema::Object;

/// Most tags one filter may name, as in Kong.
pub const FILTER_TAGS_MAX: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    /// `a,b`: every tag (one tag is this too).
    All(Vec<String>),
    /// `a/b`: any tag.
    Any(Vec<String>),
}

impl TagFilter {
    /// Parses the `tags` argument as Kong does, with Kong's errors.
    pub fn parse(text: &str) -> Result<TagFilter, ApiError> {
        if text.is_empty() {
            return Err(ApiError::invalid_option("tags", "cannot be null"));
        }
        let syntax = || ApiError::invalid_option("tags", "invalid filter syntax");
        let (all, any) = (text.contains(','), text.contains('/'));
        if all && any {
            return Err(syntax());
        }
        let tags: Vec<String> = text.split(if any { '/' } else { ',' }).map(str::to_string).collect();
        if tags.iter().any(|tag| tag.is_empty() || !valid_tag(tag)) {
            return Err(syntax());
        }
        if tags.len() > FILTER_TAGS_MAX {
            return Err(ApiError::invalid_option("tags", "cannot query more than 5 tags"));
        }
        Ok(if any { TagFilter::Any(tags) } else { TagFilter::All(tags) })
    }

    pub fn matches(&self, entity: &Object) -> bool {
        let tags = entity.get("tags").and_then(Value::as_array);
        let has = |wanted: &String| tags.is_some_and(|tags| tags.iter().any(|tag| tag.as_str() == Some(wanted)));
        match self {
            TagFilter::All(wanted) => wanted.iter().all(has),
            TagFilter::Any(wanted) => wanted.iter().any(has),
        }
    }
}

/// Kong's pattern for a tag in a filter: printable ASCII but `,` and `/`, or UTF-8. A
/// query argument that was not UTF-8 arrives with U+FFFD in its place: refused.
fn valid_tag(tag: &str) -> bool {
    tag.chars().all(|c| match c {
        ',' | '/' => false,
        ' '..='~' => true,
        '\u{FFFD}' => false,
        c => !c.is_ascii(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entity(tags: &[&str]) -> Object {
        json!({ "tags": tags }).as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn and_or_and_kong_errors() {
        let both = entity(&["corp_ a", "consumer_ 1", "🦍"]);
        let other = entity(&["corp_ a", "consumer_ 2"]);
        let filter = TagFilter::parse("corp_ a,consumer_ 1").unwrap();
        assert!(filter.matches(&both) && !filter.matches(&other));
        let filter = TagFilter::parse("consumer_ 2/consumer_ 1").unwrap();
        assert!(filter.matches(&both) && filter.matches(&other));
        assert!(TagFilter::parse("🦍").unwrap().matches(&both));
        assert!(!TagFilter::parse("''").unwrap().matches(&both));
        assert!(!TagFilter::parse("x").unwrap().matches(&entity(&[])));
        let message = |text: &str| TagFilter::parse(text).unwrap_err().message;
        assert_eq!(message(""), "invalid option (tags: cannot be null)");
        assert_eq!(message("a,b/c"), "invalid option (tags: invalid filter syntax)");
        assert_eq!(message("a/b,c"), "invalid option (tags: invalid filter syntax)");
        assert_eq!(message("a,,b"), "invalid option (tags: invalid filter syntax)");
        assert_eq!(message("\u{FFFD}"), "invalid option (tags: invalid filter syntax)");
        assert_eq!(message("a,b,c,d,e,f"), "invalid option (tags: cannot query more than 5 tags)");
    }
}
