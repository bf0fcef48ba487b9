//! The messages of `pgoutput`, PostgreSQL's own logical decoding output
//! plugin (protocol version 1, with `messages 'true'`), as a logical slot
//! streams them in `XLogData` (see [`super::replication`]).
//!
//! Version 1 sends a transaction only once it committed, whole and in
//! commit order: `Begin`, its changes, `Commit`. A large transaction is
//! spilled to disk by the server, not held in its memory or ours: each
//! message is decoded alone, borrowing from the `XLogData` it came in, and
//! nothing here keeps a transaction. Before the first change of a table in
//! a session (and again after its definition changed), the server sends
//! the table's `Relation`; a reader keeps those to make sense of the
//! tuples.
//!
//! Values come in their text form (the one `COPY` and `psql` print, with no
//! escapes), `n` for NULL, or `u` for a TOASTed value an UPDATE or DELETE
//! did not change and the server did not send.
//!
//! The format: PostgreSQL's documentation, "Logical Replication Message
//! Formats". Every read is checked: a short or unknown message is an error
//! naming what was being read, never a panic.

use std::fmt;

use bytes::{Buf, Bytes};

use super::replication::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A message `pgoutput` could not be read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOutputError {
    /// What was being read, and what was wrong.
    pub reason: String,
}

impl fmt::Display for PgOutputError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "a malformed pgoutput message: {}", self.reason)
    }
}

impl std::error::Error for PgOutputError {}

/// One message of the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// A transaction begins.
    Begin(Begin),
    /// The transaction that began ends, committed.
    Commit(Commit),
    /// The changes that follow come from this replication origin.
    Origin {
        /// The commit's LSN on the origin server.
        lsn: Lsn,
        /// The origin's name.
        name: String,
    },
    /// A table's definition, as the changes after it see it.
    Relation(Relation),
    /// A data type's name (sent for types outside `pg_catalog`).
    Type {
        /// The type's OID.
        oid: u32,
        /// Its schema.
        schema: String,
        /// Its name.
        name: String,
    },
    /// A row inserted.
    Insert {
        /// The table's OID (see [`Relation`]).
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row updated.
    Update {
        /// The table's OID (see [`Relation`]).
        relation: u32,
        /// The old row's key columns (when the key changed), or the whole
        /// old row (replica identity FULL); `None` when the key did not
        /// change.
        old: Option<OldTuple>,
        /// The new row (TOASTed values it did not change left out).
        new: Tuple,
    },
    /// A row deleted.
    Delete {
        /// The table's OID (see [`Relation`]).
        relation: u32,
        /// The row's key columns, or the whole row (replica identity FULL).
        old: OldTuple,
    },
    /// Tables truncated, together.
    Truncate {
        /// `TRUNCATE ... CASCADE`.
        cascade: bool,
        /// `TRUNCATE ... RESTART IDENTITY`.
        restart_identity: bool,
        /// The tables' OIDs.
        relations: Vec<u32>,
    },
    /// A message written by `pg_logical_emit_message`.
    Message(LogicalMessage),
}

/// `Begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// When it committed, in microseconds since the Unix epoch.
    pub commit_time_micros: i64,
    /// Its transaction id.
    pub xid: u32,
}

/// `Commit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end of the commit record: where a stream resumed after this
    /// transaction starts.
    pub end_lsn: Lsn,
    /// When it committed, in microseconds since the Unix epoch.
    pub commit_time_micros: i64,
}

/// `Relation`: a table as the changes that follow see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub oid: u32,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// `REPLICA IDENTITY`: `d` (default: the primary key), `n` (nothing),
    /// `f` (full: the whole old row), `i` (an index).
    pub replica_identity: u8,
    /// Its columns, in order (dropped columns left out; generated ones too).
    pub columns: Vec<RelationColumn>,
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key an UPDATE or DELETE names).
    pub key: bool,
    /// Its name.
    pub name: String,
    /// Its type's OID.
    pub type_oid: u32,
    /// Its type modifier (`-1` for none).
    pub type_modifier: i32,
}

/// The old row of an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity's columns hold values; the others are
    /// NULL.
    Key(Tuple),
    /// The whole old row (replica identity FULL).
    Full(Tuple),
}

impl OldTuple {
    /// The tuple, whichever it is.
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
        }
    }
}

/// A row's values, one per column of its [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<TupleValue>);

/// One column's value in a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// NULL.
    Null,
    /// A TOASTed value the change did not touch: not sent.
    UnchangedToast,
    /// The value's text form.
    Text(Bytes),
    /// The value's binary form (only with `binary 'true'`).
    Binary(Bytes),
}

/// A message of `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Written inside the transaction (and sent with it, at its commit)
    /// rather than at once.
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix it was written with.
    pub prefix: String,
    /// What it says.
    pub content: Bytes,
}

impl PgOutputMessage {
    /// Reads the one message in `data` (an `XLogData`'s payload).
    pub fn parse(data: Bytes) -> Result<Self, PgOutputError> {
        let mut reader = Reader { data };
        let tag = reader.u8("the message type")?;
        let message = match tag {
            b'B' => PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(reader.u64("Begin's final LSN")?),
                commit_time_micros: reader.timestamp("Begin's commit time")?,
                xid: reader.u32("Begin's transaction id")?,
            }),
            b'C' => {
                let _flags = reader.u8("Commit's flags")?;
                PgOutputMessage::Commit(Commit {
                    commit_lsn: Lsn(reader.u64("Commit's LSN")?),
                    end_lsn: Lsn(reader.u64("Commit's end LSN")?),
                    commit_time_micros: reader.timestamp("Commit's time")?,
                })
            }
            b'O' => PgOutputMessage::Origin {
                lsn: Lsn(reader.u64("Origin's LSN")?),
                name: reader.string("Origin's name")?,
            },
            b'R' => PgOutputMessage::Relation(reader.relation()?),
            b'Y' => PgOutputMessage::Type {
                oid: reader.u32("Type's OID")?,
                schema: reader.string("Type's schema")?,
                name: reader.string("Type's name")?,
            },
            b'I' => {
                let relation = reader.u32("Insert's relation")?;
                reader.expect(b'N', "Insert's new tuple")?;
                PgOutputMessage::Insert {
                    relation,
                    new: reader.tuple("Insert's new tuple")?,
                }
            }
            b'U' => {
                let relation = reader.u32("Update's relation")?;
                let old = match reader.u8("Update's tuple type")? {
                    b'K' => Some(OldTuple::Key(reader.tuple("Update's old key")?)),
                    b'O' => Some(OldTuple::Full(reader.tuple("Update's old row")?)),
                    b'N' => None,
                    other => return Err(unexpected("Update's tuple type", other)),
                };
                if old.is_some() {
                    reader.expect(b'N', "Update's new tuple")?;
                }
                PgOutputMessage::Update {
                    relation,
                    old,
                    new: reader.tuple("Update's new tuple")?,
                }
            }
            b'D' => {
                let relation = reader.u32("Delete's relation")?;
                let old = match reader.u8("Delete's tuple type")? {
                    b'K' => OldTuple::Key(reader.tuple("Delete's old key")?),
                    b'O' => OldTuple::Full(reader.tuple("Delete's old row")?),
                    other => return Err(unexpected("Delete's tuple type", other)),
                };
                PgOutputMessage::Delete { relation, old }
            }
            b'T' => {
                let count = reader.u32("Truncate's number of relations")?;
                let options = reader.u8("Truncate's options")?;
                let mut relations = Vec::with_capacity(count.min(1024) as usize);
                for _ in 0..count {
                    relations.push(reader.u32("Truncate's relation")?);
                }
                PgOutputMessage::Truncate {
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relations,
                }
            }
            b'M' => {
                let flags = reader.u8("Message's flags")?;
                let lsn = Lsn(reader.u64("Message's LSN")?);
                let prefix = reader.string("Message's prefix")?;
                let length = reader.u32("Message's length")? as usize;
                PgOutputMessage::Message(LogicalMessage {
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: reader.bytes(length, "Message's content")?,
                })
            }
            other => {
                return Err(PgOutputError {
                    reason: format!(
                        "unknown message type {} (ferry reads pgoutput protocol version 1)",
                        describe_byte(other)
                    ),
                });
            }
        };
        if reader.data.has_remaining() {
            return Err(PgOutputError {
                reason: format!(
                    "{} bytes after a complete {} message",
                    reader.data.remaining(),
                    describe_byte(tag)
                ),
            });
        }
        Ok(message)
    }
}

struct Reader {
    data: Bytes,
}

impl Reader {
    fn need(&self, length: usize, what: &str) -> Result<(), PgOutputError> {
        if self.data.remaining() < length {
            return Err(PgOutputError {
                reason: format!(
                    "{what}: the message ends {} bytes short",
                    length - self.data.remaining()
                ),
            });
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8, PgOutputError> {
        self.need(1, what)?;
        Ok(self.data.get_u8())
    }

    fn u16(&mut self, what: &str) -> Result<u16, PgOutputError> {
        self.need(2, what)?;
        Ok(self.data.get_u16())
    }

    fn u32(&mut self, what: &str) -> Result<u32, PgOutputError> {
        self.need(4, what)?;
        Ok(self.data.get_u32())
    }

    fn u64(&mut self, what: &str) -> Result<u64, PgOutputError> {
        self.need(8, what)?;
        Ok(self.data.get_u64())
    }

    /// A timestamp in microseconds since PostgreSQL's epoch, as
    /// microseconds since the Unix epoch.
    fn timestamp(&mut self, what: &str) -> Result<i64, PgOutputError> {
        let micros = self.u64(what)? as i64;
        Ok(micros.saturating_add(POSTGRES_EPOCH_MICROS))
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<(), PgOutputError> {
        match self.u8(what)? {
            found if found == tag => Ok(()),
            other => Err(unexpected(what, other)),
        }
    }

    fn bytes(&mut self, length: usize, what: &str) -> Result<Bytes, PgOutputError> {
        self.need(length, what)?;
        Ok(self.data.split_to(length))
    }

    /// A NUL-terminated string.
    fn string(&mut self, what: &str) -> Result<String, PgOutputError> {
        let end = self
            .data
            .iter()
            .position(|&byte| byte == 0)
            .ok_or_else(|| PgOutputError {
                reason: format!("{what}: no NUL ends the string"),
            })?;
        let text = self.data.split_to(end);
        self.data.advance(1);
        String::from_utf8(text.to_vec()).map_err(|error| PgOutputError {
            reason: format!("{what}: not UTF-8 ({error})"),
        })
    }

    fn relation(&mut self) -> Result<Relation, PgOutputError> {
        let oid = self.u32("Relation's OID")?;
        let schema = self.string("Relation's schema")?;
        let name = self.string("Relation's name")?;
        let replica_identity = self.u8("Relation's replica identity")?;
        let count = self.u16("Relation's number of columns")?;
        let mut columns = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let flags = self.u8("a column's flags")?;
            columns.push(RelationColumn {
                key: flags & 1 != 0,
                name: self.string("a column's name")?,
                type_oid: self.u32("a column's type")?,
                type_modifier: self.u32("a column's type modifier")? as i32,
            });
        }
        Ok(Relation {
            oid,
            schema,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self, what: &str) -> Result<Tuple, PgOutputError> {
        let count = self.u16(what)?;
        let mut values = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let value = match self.u8(what)? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let length = self.u32(what)? as usize;
                    TupleValue::Text(self.bytes(length, what)?)
                }
                b'b' => {
                    let length = self.u32(what)? as usize;
                    TupleValue::Binary(self.bytes(length, what)?)
                }
                other => return Err(unexpected(&format!("{what}: a value's kind"), other)),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }
}

fn unexpected(what: &str, found: u8) -> PgOutputError {
    PgOutputError {
        reason: format!("{what}: unexpected {}", describe_byte(found)),
    }
}

fn describe_byte(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        format!("byte {byte:#04x}")
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;

    fn message(build: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut data = BytesMut::new();
        build(&mut data);
        data.freeze()
    }

    fn string(data: &mut BytesMut, text: &str) {
        data.put_slice(text.as_bytes());
        data.put_u8(0);
    }

    #[test]
    fn a_transaction_reads_back() -> Result<(), PgOutputError> {
        let begin = message(|data| {
            data.put_u8(b'B');
            data.put_u64(0x16B_3748);
            data.put_u64(1_000_000);
            data.put_u32(742);
        });
        assert_eq!(
            PgOutputMessage::parse(begin)?,
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(0x16B_3748),
                commit_time_micros: 1_000_000 + POSTGRES_EPOCH_MICROS,
                xid: 742,
            })
        );
        let relation = message(|data| {
            data.put_u8(b'R');
            data.put_u32(16_384);
            string(data, "public");
            string(data, "runs");
            data.put_u8(b'd');
            data.put_u16(2);
            data.put_u8(1);
            string(data, "id");
            data.put_u32(20);
            data.put_u32(u32::MAX);
            data.put_u8(0);
            string(data, "tags");
            data.put_u32(3802);
            data.put_u32(u32::MAX);
        });
        let PgOutputMessage::Relation(relation) = PgOutputMessage::parse(relation)? else {
            return Err(PgOutputError {
                reason: "a Relation read as another message".to_owned(),
            });
        };
        assert_eq!(
            (relation.schema.as_str(), relation.name.as_str()),
            ("public", "runs")
        );
        assert!(relation.columns[0].key && !relation.columns[1].key);
        assert_eq!(relation.columns[1].type_modifier, -1);
        let update = message(|data| {
            data.put_u8(b'U');
            data.put_u32(16_384);
            data.put_u8(b'K');
            data.put_u16(2);
            data.put_u8(b't');
            data.put_u32(1);
            data.put_slice(b"7");
            data.put_u8(b'n');
            data.put_u8(b'N');
            data.put_u16(2);
            data.put_u8(b't');
            data.put_u32(1);
            data.put_slice(b"8");
            data.put_u8(b'u');
        });
        assert_eq!(
            PgOutputMessage::parse(update)?,
            PgOutputMessage::Update {
                relation: 16_384,
                old: Some(OldTuple::Key(Tuple(vec![
                    TupleValue::Text(Bytes::from_static(b"7")),
                    TupleValue::Null
                ]))),
                new: Tuple(vec![
                    TupleValue::Text(Bytes::from_static(b"8")),
                    TupleValue::UnchangedToast
                ]),
            }
        );
        let marker = message(|data| {
            data.put_u8(b'M');
            data.put_u8(1);
            data.put_u64(99);
            string(data, "ferry");
            data.put_u32(3);
            data.put_slice(b"abc");
        });
        assert_eq!(
            PgOutputMessage::parse(marker)?,
            PgOutputMessage::Message(LogicalMessage {
                transactional: true,
                lsn: Lsn(99),
                prefix: "ferry".to_owned(),
                content: Bytes::from_static(b"abc"),
            })
        );
        Ok(())
    }

    #[test]
    fn short_or_unknown_messages_are_named_errors() {
        let short = message(|data| {
            data.put_u8(b'I');
            data.put_u32(1);
            data.put_u8(b'N');
            data.put_u16(1);
            data.put_u8(b't');
            data.put_u32(10);
            data.put_slice(b"abc");
        });
        let error = PgOutputMessage::parse(short)
            .err()
            .map(|error| error.reason);
        assert_eq!(
            error.as_deref(),
            Some("Insert's new tuple: the message ends 7 bytes short")
        );
        let unknown = Bytes::from_static(b"S\0\0\0\x01");
        let error = PgOutputMessage::parse(unknown)
            .err()
            .map(|error| error.reason);
        assert_eq!(
            error.as_deref(),
            Some("unknown message type 'S' (ferry reads pgoutput protocol version 1)")
        );
        let trailing = Bytes::from_static(b"T\0\0\0\x01\x01\0\0\0\x07!");
        let error = PgOutputMessage::parse(trailing)
            .err()
            .map(|error| error.reason);
        assert_eq!(
            error.as_deref(),
            Some("1 bytes after a complete 'T' message")
        );
        // Every prefix of a good message is an error, never a panic.
        let good = message(|data| {
            data.put_u8(b'D');
            data.put_u32(5);
            data.put_u8(b'O');
            data.put_u16(1);
            data.put_u8(b't');
            data.put_u32(2);
            data.put_slice(b"42");
        });
        assert!(PgOutputMessage::parse(good.clone()).is_ok());
        for length in 0..good.len() {
            assert!(PgOutputMessage::parse(good.slice(..length)).is_err());
        }
    }
}
