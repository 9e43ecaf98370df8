//! Bounded parsing of the JSON that safetensors files carry: the header (an object
//! of tensor entries plus `__metadata__`) and pbcodec's own descriptions (an object
//! of objects). Both are "tables": an object whose rows are objects with a known
//! set of fields, each a scalar or a short array of integers.
//!
//! serde_json does the parsing; the visitors here check the schema as values
//! arrive, so a malformed header is rejected at its first wrong value instead of
//! after a general-purpose parser has built it in full: a 40 MiB header of `{}`,
//! of nested `[`, or of unknown fields costs no more than its own size. Recursion
//! never goes deeper than three levels, no array is longer than the caller's limit
//! and ignored fields are skipped without being stored.
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::corrupt;
use crate::Result;

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// Any JSON integer within i64/u64 (larger ones parse as `Float`, as in serde_json).
    Int(i128),
    /// Any other JSON number.
    Float(f64),
    /// A string.
    Str(String),
    /// An array of integers (at most the schema's `max_array` of them).
    Ints(Vec<i128>),
}

/// The fields of one row, in the schema's field order (`None`: absent).
pub type Fields = Vec<Option<Value>>;

/// A parsed table: ordinary rows in file order, and the special string-map row when
/// the schema names one and the input has it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// `(key, fields)` per row, in file order.
    pub rows: Vec<(String, Fields)>,
    /// The schema's string-map row (`__metadata__`) as `(key, value)` pairs, in
    /// file order; None when absent (an explicit `null` gives an empty list).
    pub strings: Option<Vec<(String, String)>>,
}

/// What a table may hold.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The fields a row may have.
    pub fields: &'static [&'static str],
    /// Every field is required (a row missing one is an error).
    pub require_all: bool,
    /// Fields outside `fields`: an error (`true`) or skipped unread (`false`).
    pub reject_unknown: bool,
    /// A row key whose value is an object of strings (or null) instead of fields:
    /// safetensors' `__metadata__`.
    pub strings_row: Option<&'static str>,
    /// Longest integer array accepted.
    pub max_array: usize,
}

/// The safetensors header.
pub const HEADER: Schema = Schema {
    fields: &["dtype", "shape", "data_offsets"],
    require_all: true,
    reject_unknown: true,
    strings_row: Some("__metadata__"),
    max_array: 64,
};

/// pbcodec's descriptions (`__metadata__["pbcodec"]`, docs/format.md §8); fields a
/// later writer may add are skipped.
pub const DESCRIPTIONS: Schema = Schema {
    fields: &["codec", "version", "shape", "dense_bits", "group_size", "count_bits", "salient_bits", "scale_dtype"],
    require_all: false,
    reject_unknown: false,
    strings_row: None,
    max_array: 64,
};

/// Parse `json` as a table of `schema`. Errors (`Error::Corrupt`) name the first
/// problem: invalid JSON or UTF-8, a top level that is not an object, a row that is
/// not an object, a field outside the schema, a missing field, a nested
/// object, an array holding anything but integers or more than `max_array` of them,
/// a key that appears twice. Trailing whitespace is allowed (safetensors pads its
/// header with spaces).
pub fn parse_table(json: &[u8], schema: &Schema) -> Result<Table> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let table = match de.deserialize_map(TableVisitor { schema }).and_then(|t| de.end().map(|_| t)) {
        Ok(t) => t,
        Err(e) => return corrupt(format!("not valid JSON of the expected form: {e}")),
    };
    let names = table.rows.iter().map(|(k, _)| k.as_str());
    if let Some(k) = duplicate(names) {
        return corrupt(format!("key {k:?} appears twice"));
    }
    if let Some(k) = table.strings.as_ref().and_then(|s| duplicate(s.iter().map(|(k, _)| k.as_str()))) {
        return corrupt(format!("{:?}: key {k:?} appears twice", schema.strings_row.unwrap_or("")));
    }
    Ok(table)
}

/// The first key that appears twice, if any (sorting references: no copies of the keys).
fn duplicate<'a>(keys: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut v: Vec<&str> = keys.collect();
    v.sort_unstable();
    v.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

struct TableVisitor<'s> {
    schema: &'s Schema,
}

impl<'de> Visitor<'de> for TableVisitor<'_> {
    type Value = Table;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Table, A::Error> {
        let mut out = Table::default();
        while let Some(key) = map.next_key::<String>()? {
            if Some(key.as_str()) == self.schema.strings_row {
                if out.strings.is_some() {
                    return Err(de::Error::custom(format_args!("key {key:?} appears twice")));
                }
                out.strings = Some(map.next_value_seed(StringsSeed)?.unwrap_or_default());
                continue;
            }
            let row = map.next_value_seed(RowSeed { schema: self.schema, name: &key })?;
            out.rows.push((key, row));
        }
        Ok(out)
    }
}

/// A row: an object of the schema's fields.
struct RowSeed<'s> {
    schema: &'s Schema,
    name: &'s str,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Fields;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(FieldsVisitor { schema: self.schema, name: self.name })
    }
}

struct FieldsVisitor<'s> {
    schema: &'s Schema,
    name: &'s str,
}

impl<'de> Visitor<'de> for FieldsVisitor<'_> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an object for {:?}", self.name)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Fields, A::Error> {
        let s = self.schema;
        let mut out: Fields = vec![None; s.fields.len()];
        while let Some(key) = map.next_key::<String>()? {
            let Some(i) = s.fields.iter().position(|f| *f == key) else {
                if s.reject_unknown {
                    return Err(de::Error::custom(format_args!(
                        "{:?}: unexpected field {key:?} (expected {})",
                        self.name,
                        s.fields.join(", ")
                    )));
                }
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if out[i].is_some() {
                return Err(de::Error::custom(format_args!("{:?}: field {key:?} appears twice", self.name)));
            }
            out[i] = Some(map.next_value_seed(ValueVisitor { max_array: s.max_array })?);
        }
        if s.require_all && out.iter().any(Option::is_none) {
            let missing: Vec<&str> = s.fields.iter().zip(&out).filter(|(_, v)| v.is_none()).map(|(f, _)| *f).collect();
            return Err(de::Error::custom(format_args!("{:?}: missing field(s) {}", self.name, missing.join(", "))));
        }
        Ok(out)
    }
}

/// The strings row: null, or an object mapping strings to strings.
struct StringsSeed;

impl<'de> DeserializeSeed<'de> for StringsSeed {
    type Value = Option<Vec<(String, String)>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for StringsSeed {
    type Value = Option<Vec<(String, String)>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object mapping strings to strings, or null")
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value::<String>()?;
            out.push((k, v));
        }
        Ok(Some(out))
    }
}

struct ValueVisitor {
    max_array: usize,
}

impl<'de> DeserializeSeed<'de> for ValueVisitor {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number, boolean, null or array of integers")
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::Int(v as i128))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::Int(v as i128))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Int(v)) = seq.next_element::<Int>()? {
            if out.len() == self.max_array {
                return Err(de::Error::custom(format_args!("array longer than {} entries", self.max_array)));
            }
            out.push(v);
        }
        Ok(Value::Ints(out))
    }
}

/// An array element: integers only (a nested array or object is an error at once).
struct Int(i128);

impl<'de> de::Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Int, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer (arrays may only hold integers)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Int, E> {
                Ok(Int(v as i128))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Int, E> {
                Ok(Int(v as i128))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Schema = Schema { max_array: 8, ..HEADER };

    fn ok(s: &str, schema: &Schema) -> Table {
        parse_table(s.as_bytes(), schema).unwrap()
    }
    fn err(s: &str, schema: &Schema) -> String {
        match parse_table(s.as_bytes(), schema) {
            Err(crate::Error::Corrupt(m)) => m,
            other => panic!("{s}: expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_header() {
        let t = ok(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"__metadata__":{"a":"b"}}   "#, &HEADER);
        assert_eq!(t.rows.len(), 1);
        let w = &t.rows[0].1;
        assert_eq!(w[0], Some(Value::Str("F32".into())));
        assert_eq!(w[1], Some(Value::Ints(vec![2, 3])));
        assert_eq!(t.strings, Some(vec![("a".into(), "b".into())]));
        let t = ok(r#"{"x":{"dtype":-1,"shape":18446744073709551615,"data_offsets":1.5}}"#, &HEADER);
        let x = &t.rows[0].1;
        assert_eq!(x[0], Some(Value::Int(-1)));
        assert_eq!(x[1], Some(Value::Int(u64::MAX as i128)));
        assert_eq!(x[2], Some(Value::Float(1.5)));
        // Fields in schema order, whatever the file's order.
        let t = ok(r#"{"w":{"data_offsets":[0,0],"shape":[],"dtype":"U8"}}"#, &HEADER);
        assert_eq!(t.rows[0].1[0], Some(Value::Str("U8".into())));
        assert_eq!(ok("{}", &HEADER), Table::default());
        assert_eq!(ok(r#"{"__metadata__":null}"#, &HEADER).strings, Some(vec![]));
        // Descriptions skip fields they do not know, whatever they hold.
        let t = ok(r#"{"w":{"codec":"pbcodec.pb","future":[[{"a":1}]],"version":1}}"#, &DESCRIPTIONS);
        assert_eq!(t.rows[0].1.iter().flatten().count(), 2);
    }

    #[test]
    fn rejects_at_the_first_wrong_value() {
        for bad in [
            "[1]",
            "1",
            "",
            "{",
            r#"{"a":1}"#,
            r#"{"a":[]}"#,
            r#"{"a":{}}"#,
            r#"{"a":{"dtype":"U8","shape":[],"data_offsets":[0,0],"x":1}}"#,
            r#"{"a":{"dtype":{},"shape":[],"data_offsets":[0,0]}}"#,
            r#"{"a":{"dtype":"U8","shape":[[]],"data_offsets":[0,0]}}"#,
            r#"{"a":{"dtype":"U8","shape":["x"],"data_offsets":[0,0]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1,2,3,4,5,6,7,8,9],"data_offsets":[0,0]}}"#,
            r#"{"a":{"dtype":"U8","dtype":"U8","shape":[],"data_offsets":[0,0]}}"#,
            r#"{"a":null}"#,
            r#"{"__metadata__":{"a":1}}"#,
            r#"{"__metadata__":{},"__metadata__":{}}"#,
            r#"{"__metadata__":{"a":"","a":""}}"#,
            r#"{} x"#,
            "{\"a\":{\"dtype\":\"\\ud800\",\"shape\":[],\"data_offsets\":[0,0]}}",
        ] {
            err(bad, &SMALL);
        }
        err(&"[".repeat(100_000), &HEADER);
        err(&format!("{{\"a\":{{\"dtype\":{}", "[".repeat(100_000)), &HEADER);
        err(&format!("{{\"a\":{{\"codec\":{}", "[".repeat(100_000)), &DESCRIPTIONS);
        assert!(err(r#"{"a":{"dtype":"U8","shape":[1,2,3,4,5,6,7,8,9]}}"#, &SMALL).contains("longer than 8"));
        let row = r#"{"dtype":"U8","shape":[],"data_offsets":[0,0]}"#;
        assert!(err(&format!(r#"{{"a":{row},"a":{row}}}"#), &SMALL).contains("twice"));
        assert!(err(r#"{"a":{"dtype":"U8"}}"#, &SMALL).contains("missing field(s) shape, data_offsets"));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert!(parse_table(b"{\"\xff\":null}", &HEADER).is_err());
    }
}
