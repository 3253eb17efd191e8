//! Parser for QEMU's QAPI schema language, as the 1.1-era `qapi-schema.json` writes it.
//!
//! The file is a sequence of Python-literal dictionaries: strings in single quotes, `#` comments
//! to the end of the line, `{ 'key': value, ... }` and `[ value, ... ]`. Each top-level
//! dictionary defines one entity:
//!
//! * `{ 'type': 'Name', 'data': { 'member': TYPE, '*optional': TYPE, ... } }` — a struct;
//!   a member's TYPE is a type name, a one-element list `['Name']`, or a nested dictionary
//!   (an anonymous struct).
//! * `{ 'enum': 'Name', 'data': [ 'value', ... ] }`
//! * `{ 'command': 'name', 'data': { ... }, 'returns': TYPE, 'gen': 'no' }`, `data` and
//!   `returns` optional; `gen: 'no'` marks a command whose marshaller QEMU writes by hand.
//!
//! Builtin types: `str`, `int`, `int8`..`int64`, `uint8`..`uint64`, `number`, `bool`, and
//! `visitor` (the seed's spelling of "any JSON value", used by `qom-get`/`qom-set`; later QEMU
//! calls it `any`, which is accepted too).
//!
//! Every error carries the 1-based line and column where it was found, in the style of QEMU's
//! `tests/qapi-schema/*.err` files (`file:LINE:COL: message`).
//!
//! This file has no dependencies beyond `std`: `build.rs` includes it with `#[path]` so that the
//! generator and the runtime library share one parser.

use std::collections::HashMap;
use std::fmt;

/// A position in the schema text: 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A schema that could not be parsed or does not make sense, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

impl std::error::Error for ParseError {}

fn err<T>(pos: Pos, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError { pos, message: message.into() })
}

/// The builtin (scalar) QAPI types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    Str,
    Int,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Number,
    Bool,
    /// Any JSON value (`visitor` in the seed, `any` in later QEMU).
    Any,
}

impl Builtin {
    pub const ALL: [Builtin; 13] = [
        Builtin::Str,
        Builtin::Int,
        Builtin::Int8,
        Builtin::Int16,
        Builtin::Int32,
        Builtin::Int64,
        Builtin::Uint8,
        Builtin::Uint16,
        Builtin::Uint32,
        Builtin::Uint64,
        Builtin::Number,
        Builtin::Bool,
        Builtin::Any,
    ];

    /// Looks a builtin type up by its schema name.
    pub fn from_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "str" => Builtin::Str,
            "int" => Builtin::Int,
            "int8" => Builtin::Int8,
            "int16" => Builtin::Int16,
            "int32" => Builtin::Int32,
            "int64" => Builtin::Int64,
            "uint8" => Builtin::Uint8,
            "uint16" => Builtin::Uint16,
            "uint32" => Builtin::Uint32,
            "uint64" => Builtin::Uint64,
            "number" => Builtin::Number,
            "bool" => Builtin::Bool,
            "visitor" | "any" => Builtin::Any,
            _ => return None,
        })
    }

    /// The schema's name for the type (`visitor` for [`Builtin::Any`], as the seed spells it).
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int => "int",
            Builtin::Int8 => "int8",
            Builtin::Int16 => "int16",
            Builtin::Int32 => "int32",
            Builtin::Int64 => "int64",
            Builtin::Uint8 => "uint8",
            Builtin::Uint16 => "uint16",
            Builtin::Uint32 => "uint32",
            Builtin::Uint64 => "uint64",
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Any => "visitor",
        }
    }
}

/// A member's type as written in the schema.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeExpr {
    /// A type name: a builtin, or a `'type'`/`'enum'` defined somewhere in the file.
    Named { name: String, pos: Pos },
    /// `['Name']`.
    List { element: Box<TypeExpr>, pos: Pos },
    /// A nested dictionary: an anonymous struct (only as a member's type).
    Anonymous { members: Vec<Member>, pos: Pos },
}

impl TypeExpr {
    pub fn pos(&self) -> Pos {
        match self {
            TypeExpr::Named { pos, .. } | TypeExpr::List { pos, .. } | TypeExpr::Anonymous { pos, .. } => *pos,
        }
    }
}

/// One member of a struct or of a command's arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The wire name, without the `*` that marks an optional member.
    pub name: String,
    pub optional: bool,
    pub ty: TypeExpr,
    pub pos: Pos,
}

/// `{ 'type': ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct StructDef {
    pub name: String,
    pub members: Vec<Member>,
    pub doc: Option<String>,
    pub pos: Pos,
}

/// `{ 'enum': ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct EnumDef {
    pub name: String,
    pub values: Vec<(String, Pos)>,
    pub doc: Option<String>,
    pub pos: Pos,
}

/// `{ 'command': ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct CommandDef {
    pub name: String,
    /// `None` when the command takes no arguments (no `'data'` key).
    pub data: Option<Vec<Member>>,
    /// `None` when the command returns nothing (QMP then answers `{"return": {}}`).
    pub returns: Option<TypeExpr>,
    /// `false` for `'gen': 'no'`: QEMU's marshaller is hand-written (qom-get, qom-set).
    pub gen: bool,
    pub doc: Option<String>,
    pub pos: Pos,
}

/// One top-level definition, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Entity {
    Struct(StructDef),
    Enum(EnumDef),
    Command(CommandDef),
}

impl Entity {
    pub fn name(&self) -> &str {
        match self {
            Entity::Struct(d) => &d.name,
            Entity::Enum(d) => &d.name,
            Entity::Command(d) => &d.name,
        }
    }
}

/// A parsed and checked schema. Definitions keep the file's order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schema {
    pub entities: Vec<Entity>,
}

impl Schema {
    pub fn structs(&self) -> impl Iterator<Item = &StructDef> {
        self.entities.iter().filter_map(|e| match e {
            Entity::Struct(d) => Some(d),
            _ => None,
        })
    }

    pub fn enums(&self) -> impl Iterator<Item = &EnumDef> {
        self.entities.iter().filter_map(|e| match e {
            Entity::Enum(d) => Some(d),
            _ => None,
        })
    }

    pub fn commands(&self) -> impl Iterator<Item = &CommandDef> {
        self.entities.iter().filter_map(|e| match e {
            Entity::Command(d) => Some(d),
            _ => None,
        })
    }

    pub fn find_struct(&self, name: &str) -> Option<&StructDef> {
        self.structs().find(|d| d.name == name)
    }

    pub fn find_enum(&self, name: &str) -> Option<&EnumDef> {
        self.enums().find(|d| d.name == name)
    }

    pub fn find_command(&self, name: &str) -> Option<&CommandDef> {
        self.commands().find(|d| d.name == name)
    }
}

/// Parses and checks a schema: syntax, then the meaning of each definition, then that every
/// type it names is defined.
pub fn parse(text: &str) -> Result<Schema, ParseError> {
    let exprs = Parser::new(text).parse_file()?;
    let mut schema = Schema::default();
    for (expr, doc) in exprs {
        schema.entities.push(entity(expr, doc)?);
    }
    check_names(&schema)?;
    Ok(schema)
}

// ---------------------------------------------------------------------------------------------
// Syntax: the Python-literal expression language.

/// A value in the schema's expression language.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    List(Vec<(Value, Pos)>),
    /// Keys in file order, each with its position.
    Dict(Vec<(String, Pos, Value, Pos)>),
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dictionary",
        }
    }
}

/// A top-level dictionary, where it starts, and the doc block above it.
type TopLevel = ((Value, Pos), Option<String>);

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Punct(char),
    Str(String),
    Eof,
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: u32,
    col: u32,
    tok: Tok,
    tok_pos: Pos,
    /// Text of the comment block (`##` ... `##`) just before the current token, if any.
    doc: Option<String>,
    /// Comment lines gathered since the last token.
    comment: Vec<String>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            chars: text.chars().peekable(),
            line: 1,
            col: 1,
            tok: Tok::Eof,
            tok_pos: Pos { line: 1, col: 1 },
            doc: None,
            comment: Vec::new(),
        }
    }

    fn pos(&self) -> Pos {
        Pos { line: self.line, col: self.col }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    /// Reads the next token into `self.tok`.
    fn next(&mut self) -> Result<(), ParseError> {
        self.comment.clear();
        loop {
            let pos = self.pos();
            let Some(c) = self.bump() else {
                self.tok = Tok::Eof;
                self.tok_pos = pos;
                self.doc = take_doc(&self.comment);
                return Ok(());
            };
            match c {
                ' ' | '\t' | '\r' | '\n' => {}
                '#' => {
                    let mut line = String::new();
                    while let Some(&c) = self.chars.peek() {
                        if c == '\n' {
                            break;
                        }
                        line.push(c);
                        self.bump();
                    }
                    self.comment.push(line);
                }
                '{' | '}' | '[' | ']' | ':' | ',' => {
                    self.tok = Tok::Punct(c);
                    self.tok_pos = pos;
                    self.doc = take_doc(&self.comment);
                    return Ok(());
                }
                '\'' => {
                    let mut s = String::new();
                    loop {
                        match self.bump() {
                            None | Some('\n') => return err(pos, "missing terminating \"'\""),
                            Some('\'') => break,
                            Some('\\') => match self.bump() {
                                Some(c @ ('\\' | '\'')) => s.push(c),
                                Some(c) if c != '\n' => {
                                    // The backslash: two characters back.
                                    let at = Pos { line: self.line, col: self.col - 2 };
                                    return err(at, format!("unknown escape \\{c}"));
                                }
                                _ => return err(pos, "missing terminating \"'\""),
                            },
                            Some(c) if (c as u32) < 0x20 => return err(pos, "control character in string"),
                            Some(c) => s.push(c),
                        }
                    }
                    self.tok = Tok::Str(s);
                    self.tok_pos = pos;
                    self.doc = take_doc(&self.comment);
                    return Ok(());
                }
                '"' => return err(pos, "strings are quoted with ' in the schema, not \""),
                c => return err(pos, format!("stray '{c}'")),
            }
        }
    }

    /// The whole file: a sequence of top-level dictionaries, each with the doc block above it.
    fn parse_file(mut self) -> Result<Vec<TopLevel>, ParseError> {
        let mut exprs = Vec::new();
        self.next()?;
        loop {
            match self.tok {
                Tok::Eof => return Ok(exprs),
                Tok::Punct('{') => {
                    let doc = self.doc.take();
                    let pos = self.tok_pos;
                    let value = self.value()?;
                    exprs.push(((value, pos), doc));
                }
                _ => return err(self.tok_pos, "expected '{' (a top-level definition)"),
            }
        }
    }

    /// Parses the value starting at the current token and moves past it.
    fn value(&mut self) -> Result<Value, ParseError> {
        match std::mem::replace(&mut self.tok, Tok::Eof) {
            Tok::Str(s) => {
                self.next()?;
                Ok(Value::Str(s))
            }
            Tok::Punct('{') => {
                let mut entries: Vec<(String, Pos, Value, Pos)> = Vec::new();
                self.next()?;
                if self.tok == Tok::Punct('}') {
                    self.next()?;
                    return Ok(Value::Dict(entries));
                }
                loop {
                    let key_pos = self.tok_pos;
                    let Tok::Str(key) = std::mem::replace(&mut self.tok, Tok::Eof) else {
                        return err(key_pos, "expected a string key");
                    };
                    if entries.iter().any(|(k, ..)| *k == key) {
                        return err(key_pos, format!("duplicate key '{key}'"));
                    }
                    self.next()?;
                    if self.tok != Tok::Punct(':') {
                        return err(self.tok_pos, "expected ':'");
                    }
                    self.next()?;
                    let value_pos = self.tok_pos;
                    let value = self.value()?;
                    entries.push((key, key_pos, value, value_pos));
                    match self.tok {
                        Tok::Punct(',') => self.next()?,
                        Tok::Punct('}') => {
                            self.next()?;
                            return Ok(Value::Dict(entries));
                        }
                        _ => return err(self.tok_pos, "expected ',' or '}'"),
                    }
                }
            }
            Tok::Punct('[') => {
                let mut items = Vec::new();
                self.next()?;
                if self.tok == Tok::Punct(']') {
                    self.next()?;
                    return Ok(Value::List(items));
                }
                loop {
                    let pos = self.tok_pos;
                    items.push((self.value()?, pos));
                    match self.tok {
                        Tok::Punct(',') => self.next()?,
                        Tok::Punct(']') => {
                            self.next()?;
                            return Ok(Value::List(items));
                        }
                        _ => return err(self.tok_pos, "expected ',' or ']'"),
                    }
                }
            }
            Tok::Eof => err(self.tok_pos, "unexpected end of file, expected a value"),
            Tok::Punct(c) => err(self.tok_pos, format!("expected a value, found '{c}'")),
        }
    }
}

/// The text of a `##` ... `##` doc block, without the `#` markers, if `lines` is one.
fn take_doc(lines: &[String]) -> Option<String> {
    // A `##` line reads as "#" once its first '#' is gone; a block is opener .. closer.
    let is_marker = |l: &String| l.trim_end() == "#";
    let last = lines.len().checked_sub(1)?;
    if !is_marker(&lines[last]) {
        return None;
    }
    let open = lines[..last].iter().rposition(is_marker)?;
    let text: Vec<&str> = lines[open + 1..last].iter().map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end()).collect();
    Some(text.join("\n").trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// Meaning: each top-level dictionary as a definition.

fn is_member_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_type_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

fn is_enum_value(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn entity((value, pos): (Value, Pos), doc: Option<String>) -> Result<Entity, ParseError> {
    let Value::Dict(entries) = value else { unreachable!("parse_file only yields dictionaries") };
    let Some((meta, meta_pos, name_value, name_pos)) =
        entries.iter().find(|(k, ..)| matches!(k.as_str(), "type" | "enum" | "command"))
    else {
        return err(pos, "definition has none of 'type', 'enum', 'command'");
    };
    if let Some((other, other_pos, ..)) =
        entries.iter().find(|(k, ..)| k != meta && matches!(k.as_str(), "type" | "enum" | "command"))
    {
        return err(*other_pos, format!("definition has both '{meta}' and '{other}'"));
    }
    let _ = meta_pos;
    let Value::Str(name) = name_value else {
        return err(*name_pos, format!("'{meta}' must name the definition, found {}", name_value.describe()));
    };
    let allowed: &[&str] = match meta.as_str() {
        "type" => &["type", "data"],
        "enum" => &["enum", "data"],
        _ => &["command", "data", "returns", "gen"],
    };
    let what = format!("{meta} '{name}'");
    for (key, key_pos, ..) in &entries {
        if !allowed.contains(&key.as_str()) {
            return err(*key_pos, format!("{what}: unknown key '{key}'"));
        }
    }
    let get = |key: &str| entries.iter().find(|(k, ..)| k == key).map(|(_, key_pos, v, vpos)| (v, *key_pos, *vpos));
    match meta.as_str() {
        "type" => {
            if !is_type_name(name) {
                return err(*name_pos, format!("bad type name '{name}'"));
            }
            let Some((data, _, data_pos)) = get("data") else {
                return err(pos, format!("{what}: missing 'data'"));
            };
            Ok(Entity::Struct(StructDef {
                name: name.clone(),
                members: members(&what, data, data_pos)?,
                doc,
                pos: *name_pos,
            }))
        }
        "enum" => {
            if !is_type_name(name) {
                return err(*name_pos, format!("bad enum name '{name}'"));
            }
            let Some((data, _, data_pos)) = get("data") else {
                return err(pos, format!("{what}: missing 'data'"));
            };
            let Value::List(items) = data else {
                return err(data_pos, format!("{what}: 'data' must be a list of strings, found {}", data.describe()));
            };
            let mut values: Vec<(String, Pos)> = Vec::new();
            for (item, item_pos) in items {
                let Value::Str(v) = item else {
                    return err(*item_pos, format!("{what}: values must be strings"));
                };
                if !is_enum_value(v) {
                    return err(*item_pos, format!("{what}: bad value '{v}'"));
                }
                if let Some((_, first)) = values.iter().find(|(x, _)| x == v) {
                    return err(*item_pos, format!("{what}: value '{v}' repeats the one at line {}", first.line));
                }
                values.push((v.clone(), *item_pos));
            }
            Ok(Entity::Enum(EnumDef { name: name.clone(), values, doc, pos: *name_pos }))
        }
        _ => {
            if !is_member_name(name) {
                return err(*name_pos, format!("bad command name '{name}'"));
            }
            let data = match get("data") {
                Some((data, _, data_pos)) => Some(members(&what, data, data_pos)?),
                None => None,
            };
            let returns = match get("returns") {
                Some((Value::Dict(_), _, rpos)) => {
                    return err(rpos, format!("{what}: 'returns' must name a type or a list"))
                }
                Some((v, _, rpos)) => Some(type_expr(&what, v, rpos)?),
                None => None,
            };
            let gen = match get("gen") {
                None => true,
                Some((Value::Str(s), _, _)) if s == "no" => false,
                Some((_, _, gpos)) => return err(gpos, format!("{what}: 'gen' may only be 'no'")),
            };
            Ok(Entity::Command(CommandDef { name: name.clone(), data, returns, gen, doc, pos: *name_pos }))
        }
    }
}

/// A `'data'` dictionary of a struct or command (or a nested anonymous struct).
fn members(what: &str, data: &Value, pos: Pos) -> Result<Vec<Member>, ParseError> {
    let Value::Dict(entries) = data else {
        return err(pos, format!("{what}: 'data' must be a dictionary, found {}", data.describe()));
    };
    let mut out: Vec<Member> = Vec::new();
    for (key, key_pos, value, value_pos) in entries {
        let (name, optional) = match key.strip_prefix('*') {
            Some(rest) => (rest, true),
            None => (key.as_str(), false),
        };
        if !is_member_name(name) {
            return err(*key_pos, format!("{what}: bad member name '{key}'"));
        }
        if let Some(first) = out.iter().find(|m| m.name == name) {
            return err(*key_pos, format!("{what}: member '{name}' repeats the one at line {}", first.pos.line));
        }
        out.push(Member {
            name: name.to_string(),
            optional,
            ty: type_expr(&format!("{what} member '{name}'"), value, *value_pos)?,
            pos: *key_pos,
        });
    }
    Ok(out)
}

fn type_expr(what: &str, value: &Value, pos: Pos) -> Result<TypeExpr, ParseError> {
    match value {
        Value::Str(name) => Ok(TypeExpr::Named { name: name.clone(), pos }),
        Value::List(items) => match items.as_slice() {
            [(Value::Str(name), item_pos)] => {
                Ok(TypeExpr::List { element: Box::new(TypeExpr::Named { name: name.clone(), pos: *item_pos }), pos })
            }
            _ => err(pos, format!("{what}: a list type holds exactly one type name")),
        },
        Value::Dict(_) => Ok(TypeExpr::Anonymous { members: members(what, value, pos)?, pos }),
    }
}

/// Every name is defined once, and every type a member or command names exists.
fn check_names(schema: &Schema) -> Result<(), ParseError> {
    let mut defined: HashMap<&str, (&str, Pos)> = HashMap::new();
    for e in &schema.entities {
        let (kind, pos) = match e {
            Entity::Struct(d) => ("type", d.pos),
            Entity::Enum(d) => ("enum", d.pos),
            Entity::Command(d) => ("command", d.pos),
        };
        let name = e.name();
        if kind != "command" && Builtin::from_name(name).is_some() {
            return err(pos, format!("'{name}' is a builtin type"));
        }
        // Commands live in their own namespace (QEMU's 'cpu' command vs a type would not clash),
        // but two commands, or two types, may not share a name.
        let key = if kind == "command" { None } else { Some(name) };
        if let Some(key) = key {
            if let Some((other, first)) = defined.get(key) {
                return err(pos, format!("'{name}' is already defined as {other} at line {}", first.line));
            }
            defined.insert(key, (kind, pos));
        }
    }
    let mut commands: HashMap<&str, Pos> = HashMap::new();
    for c in schema.commands() {
        if let Some(first) = commands.insert(&c.name, c.pos) {
            return err(c.pos, format!("command '{}' is already defined at line {}", c.name, first.line));
        }
    }
    let known = |name: &str| Builtin::from_name(name).is_some() || defined.contains_key(name);
    /// `owner` names the definition ("type 'A' member"), `path` the member ("b.c").
    fn walk(owner: &str, path: &str, ty: &TypeExpr, known: &dyn Fn(&str) -> bool) -> Result<(), ParseError> {
        match ty {
            TypeExpr::Named { name, pos } => {
                if known(name) {
                    Ok(())
                } else {
                    err(*pos, format!("{owner} '{path}' uses unknown type '{name}'"))
                }
            }
            TypeExpr::List { element, .. } => walk(owner, path, element, known),
            TypeExpr::Anonymous { members, .. } => {
                for m in members {
                    walk(owner, &format!("{path}.{}", m.name), &m.ty, known)?;
                }
                Ok(())
            }
        }
    }
    for e in &schema.entities {
        match e {
            Entity::Struct(d) => {
                let owner = format!("type '{}' member", d.name);
                for m in &d.members {
                    walk(&owner, &m.name, &m.ty, &known)?;
                }
            }
            Entity::Enum(_) => {}
            Entity::Command(d) => {
                let owner = format!("command '{}' argument", d.name);
                for m in d.data.iter().flatten() {
                    walk(&owner, &m.name, &m.ty, &known)?;
                }
                if let Some(r) = &d.returns {
                    walk(&format!("command '{}'", d.name), "returns", r, &known)?;
                }
            }
        }
    }
    Ok(())
}
