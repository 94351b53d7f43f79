//! The TOML config file of `serve`: every flag, under the flag's own long name.
//!
//! Read from `--config PATH`, else from [`SYSTEM_CONFIG`] when it exists. The file is turned into
//! command-line arguments (ripgrep's way): `key = "v"` becomes `--key v`, a list repeats the flag,
//! `true` sets a switch. `cli::parse` places them before the real arguments and leaves out every
//! key whose flag the command line gives, so clap parses everything once, with the same value
//! parsers, and the command line wins. Each key is also parsed alone first, so an unknown key, a
//! value of the wrong type or one its flag's parser refuses is an error naming the key and its
//! line, before anything starts. Nothing here knows the flags: they come from the clap command.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::ArgAction;
use toml::{Spanned, Value};

/// Read when no `--config` is given and the file exists.
pub const SYSTEM_CONFIG: &str = "/etc/local-nix-cache/config.toml";

/// Keys that are flags but not settings of a running `serve`.
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("config {path}, line {line}: key `{key}`: {message}")]
    Value {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// Which config file applies: `--config`, else the system one if present.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_owned()),
        None => Path::new(SYSTEM_CONFIG).exists().then(|| PathBuf::from(SYSTEM_CONFIG)),
    }
}

/// Reads the file at `path` and turns it into arguments of `cmd` (see [`to_args`]).
pub fn load_as_args(
    cmd: &clap::Command,
    path: &Path,
    on_command_line: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    to_args(cmd, path, &text, on_command_line)
}

/// Turns the config text into arguments of `cmd` (a subcommand, e.g. `serve`), skipping keys
/// whose argument id `on_command_line` reports as given on the command line. Every key is
/// checked by `cmd`'s own parser.
pub fn to_args(
    cmd: &clap::Command,
    path: &Path,
    text: &str,
    on_command_line: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let table: std::collections::BTreeMap<String, Spanned<Value>> =
        toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let mut out = Vec::new();
    for (key, spanned) in &table {
        let value = spanned.get_ref();
        // The value's line; the key stands on the same line.
        let line = text[..spanned.span().start.min(text.len())].matches('\n').count() + 1;
        let bad = |message: String| ConfigError::Value {
            path: path.to_owned(),
            line,
            key: key.clone(),
            message,
        };
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| bad("unknown key (keys are `serve`'s flag names)".into()))?;
        let args = key_args(key, arg, value).map_err(bad)?;
        // The key alone through the flag's own parser: its error carries the key and line.
        let alone = std::iter::once(OsString::from(cmd.get_name())).chain(args.iter().cloned());
        cmd.clone()
            .try_get_matches_from(alone)
            .map_err(|e| bad(clap_message(&e)))?;
        if !on_command_line(arg.get_id().as_str()) {
            out.extend(args);
        }
    }
    Ok(out)
}

/// The arguments one key stands for.
fn key_args(key: &str, arg: &clap::Arg, value: &Value) -> Result<Vec<OsString>, String> {
    let flag = format!("--{key}");
    let scalar = |v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            other => Err(format!("expected a string or a number, found {}", other.type_str())),
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            Value::Boolean(true) => Ok(vec![flag.into()]),
            Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("expected true or false, found {}", other.type_str())),
        },
        ArgAction::Append => {
            let items: Vec<&Value> = match value {
                Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            let mut out = Vec::new();
            for v in items {
                out.push(OsString::from(&flag));
                out.push(scalar(v)?.into());
            }
            Ok(out)
        }
        // A flag that takes `true|false`: a TOML boolean.
        _ if arg.get_value_parser().type_id() == clap::builder::ValueParser::bool().type_id() => match value {
            Value::Boolean(b) => Ok(vec![flag.into(), b.to_string().into()]),
            other => Err(format!("expected true or false, found {}", other.type_str())),
        },
        _ => Ok(vec![flag.into(), scalar(value)?.into()]),
    }
}

/// clap's error without its usage lines and colour.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}
