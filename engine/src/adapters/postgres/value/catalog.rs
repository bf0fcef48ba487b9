//! From `pg_type` rows to the [`PgType`] that says how a column is carried,
//! or the [`Refused`] that says why it cannot be.

use std::collections::HashMap;
use std::fmt;

/// How the values of one column are carried: the rule of the table in
/// [`value`](super)'s docs that applies to it. Domains are their base type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    /// `bool`.
    Bool,
    /// `int2`.
    Int2,
    /// `int4`.
    Int4,
    /// `int8`.
    Int8,
    /// `oid`, and the `lo` extension's domain over it: a large-object
    /// reference, carried as its number; the large object is not copied.
    Oid,
    /// `float4`.
    Float4,
    /// `float8`.
    Float8,
    /// `numeric`.
    Numeric,
    /// `text`, `varchar`, `bpchar`, `name`, `"char"` and the `citext`
    /// extension's type.
    Text,
    /// `bytea`.
    Bytea,
    /// `json`.
    Json,
    /// `jsonb`.
    Jsonb,
    /// `timestamptz`.
    Timestamptz,
    /// `timestamp` (without time zone).
    Timestamp,
    /// `date`.
    Date,
    /// `time`.
    Time,
    /// `timetz`.
    Timetz,
    /// `interval`.
    Interval,
    /// `uuid`.
    Uuid,
    /// Any enum type: its label.
    Enum,
    /// An array of `element`, whose literal separates elements with
    /// `delimiter` (the element type's `typdelim`: `,` for every built-in
    /// type but `box`, which uses `;`).
    Array {
        /// The element type; never itself an array (the elements of an
        /// array of a domain over an array are [`PgType::Other`]).
        element: Box<PgType>,
        /// The ASCII byte between elements in the array literal.
        delimiter: u8,
    },
    /// Every other type (composite, range, multirange, `inet`, `xml`,
    /// geometric, extension types...): its text form, exactly as
    /// PostgreSQL prints it, which PostgreSQL reads back as the same value.
    Other {
        /// `typname`, for messages.
        name: String,
    },
}

impl PgType {
    /// Carried as a JSON string of its text form, as it is (`numeric`,
    /// the text types, `uuid`, enums, `time`, `timetz`, `interval` and
    /// every other type).
    pub fn is_carried_as_text(&self) -> bool {
        // Every type named: a new one must choose.
        match self {
            PgType::Numeric
            | PgType::Text
            | PgType::Uuid
            | PgType::Enum
            | PgType::Time
            | PgType::Timetz
            | PgType::Interval
            | PgType::Other { .. } => true,
            PgType::Bool
            | PgType::Int2
            | PgType::Int4
            | PgType::Int8
            | PgType::Oid
            | PgType::Float4
            | PgType::Float8
            | PgType::Bytea
            | PgType::Json
            | PgType::Jsonb
            | PgType::Timestamptz
            | PgType::Timestamp
            | PgType::Date
            | PgType::Array { .. } => false,
        }
    }
}

impl fmt::Display for PgType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            PgType::Bool => "bool",
            PgType::Int2 => "int2",
            PgType::Int4 => "int4",
            PgType::Int8 => "int8",
            PgType::Oid => "oid",
            PgType::Float4 => "float4",
            PgType::Float8 => "float8",
            PgType::Numeric => "numeric",
            PgType::Text => "text",
            PgType::Bytea => "bytea",
            PgType::Json => "json",
            PgType::Jsonb => "jsonb",
            PgType::Timestamptz => "timestamptz",
            PgType::Timestamp => "timestamp",
            PgType::Date => "date",
            PgType::Time => "time",
            PgType::Timetz => "timetz",
            PgType::Interval => "interval",
            PgType::Uuid => "uuid",
            PgType::Enum => "enum",
            PgType::Array { element, .. } => return write!(formatter, "{element}[]"),
            PgType::Other { name } => name,
        };
        formatter.write_str(name)
    }
}

/// One row of `pg_type`, as the adapter reads it from the catalog:
///
/// ```sql
/// SELECT oid, typname, typtype, typcategory, typelem, typbasetype, typdelim
/// FROM pg_type WHERE oid = ANY($1)
/// ```
///
/// for the columns' types and, in turn, the element and base types they
/// name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRow {
    /// `oid`.
    pub oid: u32,
    /// `typname`.
    pub name: String,
    /// `typtype`: `b` base, `c` composite, `d` domain, `e` enum, `p`
    /// pseudo-type, `r` range, `m` multirange.
    pub kind: u8,
    /// `typcategory`: `A` for arrays.
    pub category: u8,
    /// `typelem`: the element type of an array, 0 when none.
    pub element_oid: u32,
    /// `typbasetype`: the type a domain is over, 0 when not a domain.
    pub base_oid: u32,
    /// `typdelim`: what separates this type's values in an array literal.
    pub delimiter: u8,
}

/// A column type ferry does not carry, and why: the extract stops before
/// reading a row rather than write values a restore cannot give back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ferry cannot carry values of type {type_name}: {why}")]
pub struct Refused {
    /// The type as the catalog names it (the domain or the array, not only
    /// what it is made of).
    pub type_name: String,
    /// Why not, and what to do.
    pub why: String,
}

/// The types the extract has read from `pg_type`, by oid.
#[derive(Debug, Clone, Default)]
pub struct TypeCatalog {
    rows: HashMap<u32, TypeRow>,
}

/// Domains over domains deeper than this are taken for a broken catalog.
const MAX_DOMAIN_DEPTH: usize = 32;

/// Built-in types keep their oids across PostgreSQL versions
/// (`pg_type.dat`); types an extension or a user creates get oids from
/// this one up, and are known by name.
const FIRST_NORMAL_OID: u32 = 16384;

impl TypeCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one type.
    pub fn insert(&mut self, row: TypeRow) {
        self.rows.insert(row.oid, row);
    }

    /// The element type of the array type `oid`; 0 when it is none or
    /// unknown.
    pub fn element_of(&self, oid: u32) -> u32 {
        self.rows.get(&oid).map_or(0, |row| row.element_oid)
    }

    /// How a column of type `oid` is carried, or why it is refused.
    ///
    /// Refused: `money` (its text form follows `lc_monetary`, so another
    /// server can read it as another amount or not at all), pseudo-types,
    /// and domains and arrays over a refused type. A type whose row, or
    /// whose element's or base's row, is missing from the catalog is
    /// refused too: the caller must insert them all.
    pub fn classify(&self, oid: u32) -> Result<PgType, Refused> {
        let row = self.row(oid, None)?;
        self.classify_row(row, &row.name, 0)
    }

    fn row(&self, oid: u32, wanted_by: Option<&str>) -> Result<&TypeRow, Refused> {
        self.rows.get(&oid).ok_or_else(|| Refused {
            type_name: wanted_by.map_or_else(|| format!("oid {oid}"), str::to_owned),
            why: format!(
                "type oid {oid} is not in the catalog ferry read; this is a bug in the adapter"
            ),
        })
    }

    /// `column_type` is the name the column was declared with, for messages.
    fn classify_row(
        &self,
        row: &TypeRow,
        column_type: &str,
        depth: usize,
    ) -> Result<PgType, Refused> {
        let refuse = |why: String| Refused {
            type_name: column_type.to_owned(),
            why,
        };
        match row.kind {
            b'd' => {
                if depth >= MAX_DOMAIN_DEPTH {
                    return Err(refuse(format!(
                        "domains nest more than {MAX_DOMAIN_DEPTH} deep; the catalog looks broken"
                    )));
                }
                let base = self.row(row.base_oid, Some(column_type))?;
                self.classify_row(base, &base.name, depth + 1)
                    .map_err(|refused| within(refused, column_type, "a domain over"))
            }
            b'p' => Err(refuse(format!(
                "{} is a pseudo-type, which no table can store",
                row.name
            ))),
            b'e' => Ok(PgType::Enum),
            b'c' | b'r' | b'm' => Ok(PgType::Other {
                name: row.name.clone(),
            }),
            b'b' if is_array(row) => {
                let element_row = self.row(row.element_oid, Some(column_type))?;
                let element = match self
                    .classify_row(element_row, &element_row.name, depth + 1)
                    .map_err(|refused| within(refused, column_type, "an array of"))?
                {
                    // An array of a domain over an array: each element is
                    // one array, carried as its text, as a JSON array here
                    // would read back as a dimension.
                    PgType::Array { .. } => PgType::Other {
                        name: element_row.name.clone(),
                    },
                    element => element,
                };
                if !element_row.delimiter.is_ascii() || element_row.delimiter == b'"' {
                    return Err(refuse(format!(
                        "its element type {} separates array elements with byte {:#04x}, \
                         which ferry's array parser does not handle",
                        element_row.name, element_row.delimiter
                    )));
                }
                Ok(PgType::Array {
                    element: Box::new(element),
                    delimiter: element_row.delimiter,
                })
            }
            b'b' => classify_base(row).map_err(refuse),
            other => Err(refuse(format!(
                "its typtype {:?} is not one ferry knows",
                char::from(other)
            ))),
        }
    }
}

/// A refusal of what `outer` is made of, said of `outer`.
fn within(refused: Refused, outer: &str, how: &str) -> Refused {
    if refused.type_name == outer {
        return refused;
    }
    Refused {
        type_name: outer.to_owned(),
        why: format!("it is {how} {}, and {}", refused.type_name, refused.why),
    }
}

/// True arrays: category `A` with an element type, but not `int2vector` and
/// `oidvector`, whose text form is space-separated numbers, not `{...}`.
fn is_array(row: &TypeRow) -> bool {
    const INT2VECTOR: u32 = 22;
    const OIDVECTOR: u32 = 30;
    row.category == b'A' && row.element_oid != 0 && !matches!(row.oid, INT2VECTOR | OIDVECTOR)
}

fn classify_base(row: &TypeRow) -> Result<PgType, String> {
    if row.oid >= FIRST_NORMAL_OID {
        return Ok(match row.name.as_str() {
            "citext" => PgType::Text,
            _ => PgType::Other {
                name: row.name.clone(),
            },
        });
    }
    Ok(match row.oid {
        16 => PgType::Bool,
        17 => PgType::Bytea,
        18 | 19 | 25 | 1042 | 1043 => PgType::Text,
        20 => PgType::Int8,
        21 => PgType::Int2,
        23 => PgType::Int4,
        26 => PgType::Oid,
        114 => PgType::Json,
        700 => PgType::Float4,
        701 => PgType::Float8,
        790 => {
            return Err(
                "its text form follows the server's lc_monetary (currency symbol, separators), \
                 so another server may read it as another amount or not at all; \
                 extract a view that casts the column to numeric instead"
                    .to_owned(),
            );
        }
        1082 => PgType::Date,
        1083 => PgType::Time,
        1114 => PgType::Timestamp,
        1184 => PgType::Timestamptz,
        1186 => PgType::Interval,
        1266 => PgType::Timetz,
        1700 => PgType::Numeric,
        2950 => PgType::Uuid,
        3802 => PgType::Jsonb,
        _ => PgType::Other {
            name: row.name.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(oid: u32, name: &str) -> TypeRow {
        TypeRow {
            oid,
            name: name.to_owned(),
            kind: b'b',
            category: b'U',
            element_oid: 0,
            base_oid: 0,
            delimiter: b',',
        }
    }

    fn array_of(oid: u32, name: &str, element_oid: u32) -> TypeRow {
        TypeRow {
            category: b'A',
            element_oid,
            ..base(oid, name)
        }
    }

    fn domain(oid: u32, name: &str, base_oid: u32) -> TypeRow {
        TypeRow {
            kind: b'd',
            base_oid,
            ..base(oid, name)
        }
    }

    fn catalog(rows: impl IntoIterator<Item = TypeRow>) -> TypeCatalog {
        let mut catalog = TypeCatalog::new();
        for row in rows {
            catalog.insert(row);
        }
        catalog
    }

    #[test]
    fn built_in_types_are_known_by_oid_not_by_a_name_a_user_can_reuse() {
        let catalog = catalog([
            base(23, "int4"),
            base(1184, "timestamptz"),
            base(3802, "jsonb"),
            base(1043, "varchar"),
            // A user type in another schema that happens to be called money.
            base(70000, "money"),
            base(70001, "citext"),
            base(70002, "hstore"),
        ]);
        assert_eq!(catalog.classify(23), Ok(PgType::Int4));
        assert_eq!(catalog.classify(1184), Ok(PgType::Timestamptz));
        assert_eq!(catalog.classify(3802), Ok(PgType::Jsonb));
        assert_eq!(catalog.classify(1043), Ok(PgType::Text));
        assert_eq!(
            catalog.classify(70000),
            Ok(PgType::Other {
                name: "money".into()
            })
        );
        assert_eq!(catalog.classify(70001), Ok(PgType::Text));
        assert_eq!(
            catalog.classify(70002),
            Ok(PgType::Other {
                name: "hstore".into()
            })
        );
    }

    #[test]
    fn money_is_refused_and_says_what_to_do() {
        let catalog = catalog([base(790, "money")]);
        let refused = catalog.classify(790).expect_err("refused");
        assert_eq!(refused.type_name, "money");
        assert!(refused.why.contains("lc_monetary"), "{refused}");
        assert!(refused.why.contains("numeric"), "{refused}");
    }

    #[test]
    fn domains_are_their_base_type_and_a_domain_over_money_is_refused_by_its_own_name() {
        let catalog = catalog([
            base(26, "oid"),
            domain(70010, "lo", 26),
            domain(70011, "positive_int", 23),
            domain(70012, "small_positive", 70011),
            base(23, "int4"),
            base(790, "money"),
            domain(70013, "price", 790),
        ]);
        assert_eq!(catalog.classify(70010), Ok(PgType::Oid));
        assert_eq!(catalog.classify(70012), Ok(PgType::Int4));
        let refused = catalog.classify(70013).expect_err("refused");
        assert_eq!(refused.type_name, "price");
        assert!(
            refused.why.starts_with("it is a domain over money"),
            "{refused}"
        );
    }

    #[test]
    fn arrays_carry_their_element_and_its_delimiter() {
        let catalog = catalog([
            base(25, "text"),
            array_of(1009, "_text", 25),
            TypeRow {
                delimiter: b';',
                ..base(603, "box")
            },
            array_of(1020, "_box", 603),
            base(790, "money"),
            array_of(791, "_money", 790),
            TypeRow {
                category: b'A',
                element_oid: 21,
                ..base(22, "int2vector")
            },
        ]);
        assert_eq!(
            catalog.classify(1009),
            Ok(PgType::Array {
                element: Box::new(PgType::Text),
                delimiter: b','
            })
        );
        assert_eq!(
            catalog.classify(1020),
            Ok(PgType::Array {
                element: Box::new(PgType::Other { name: "box".into() }),
                delimiter: b';'
            })
        );
        let refused = catalog.classify(791).expect_err("refused");
        assert_eq!(refused.type_name, "_money");
        assert!(
            refused.why.starts_with("it is an array of money"),
            "{refused}"
        );
        assert_eq!(
            catalog.classify(22),
            Ok(PgType::Other {
                name: "int2vector".into()
            })
        );
    }

    #[test]
    fn an_array_of_a_domain_over_an_array_carries_each_element_as_its_text() {
        let catalog = catalog([
            base(23, "int4"),
            array_of(1007, "_int4", 23),
            domain(70030, "int_list", 1007),
            array_of(70031, "_int_list", 70030),
        ]);
        assert_eq!(
            catalog.classify(70031),
            Ok(PgType::Array {
                element: Box::new(PgType::Other {
                    name: "int_list".into()
                }),
                delimiter: b','
            })
        );
    }

    #[test]
    fn enums_composites_ranges_and_pseudo_types() {
        let catalog = catalog([
            TypeRow {
                kind: b'e',
                ..base(70020, "mood")
            },
            TypeRow {
                kind: b'c',
                ..base(70021, "address")
            },
            TypeRow {
                kind: b'r',
                ..base(3904, "int4range")
            },
            TypeRow {
                kind: b'm',
                ..base(4451, "int4multirange")
            },
            TypeRow {
                kind: b'p',
                ..base(2249, "record")
            },
        ]);
        assert_eq!(catalog.classify(70020), Ok(PgType::Enum));
        assert_eq!(
            catalog.classify(70021),
            Ok(PgType::Other {
                name: "address".into()
            })
        );
        assert_eq!(
            catalog.classify(3904),
            Ok(PgType::Other {
                name: "int4range".into()
            })
        );
        assert_eq!(
            catalog.classify(4451),
            Ok(PgType::Other {
                name: "int4multirange".into()
            })
        );
        assert!(
            catalog
                .classify(2249)
                .expect_err("refused")
                .why
                .contains("pseudo-type")
        );
    }

    #[test]
    fn a_type_missing_from_the_catalog_is_refused_as_an_adapter_bug() {
        let catalog = catalog([array_of(1007, "_int4", 23)]);
        let refused = catalog.classify(1007).expect_err("refused");
        assert_eq!(refused.type_name, "_int4");
        assert!(refused.why.contains("oid 23"), "{refused}");
        assert!(
            catalog
                .classify(5)
                .expect_err("refused")
                .why
                .contains("oid 5")
        );
    }

    #[test]
    fn display_names_arrays_by_their_element() {
        let array = PgType::Array {
            element: Box::new(PgType::Timestamptz),
            delimiter: b',',
        };
        assert_eq!(array.to_string(), "timestamptz[]");
    }
}
