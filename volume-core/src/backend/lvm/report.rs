//! Typed views of LVM's JSON reports (`--reportformat json --units b
//! --nosuffix`), parsed without I/O so that they can be tested on any host.
//!
//! The shape is `{"report": [{"lv": [{"field": "value", ...}, ...]}]}`;
//! every value is a string, sizes are plain byte counts, percentages are
//! `"12.34"`, and a field that does not apply is `""`. With
//! `report/compact_output=1` LVM leaves out a field that is empty in every
//! row, so a missing optional field means the same as `""`.

use crate::health::{PoolHealth, VolumeHealth};
use crate::units::{Bytes, ExtentSize, Percent};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

/// The `lvs -o` columns that [`parse_lv_report`] reads.
pub const LV_FIELDS: &str = "vg_name,lv_name,lv_layout,pool_lv,lv_size,lv_tags,lv_active,\
                             lv_path,data_percent,metadata_percent,lv_metadata_size,\
                             lv_when_full,vg_extent_size,vg_free,lv_attr,\
                             lv_health_status";

/// The `lvs -o` columns of a report that asks LVM for nothing the kernel
/// holds (no activity, use or health): LVM then queries no LV's device, so
/// the report costs the same however many thin LVs are active. Parsed by
/// [`parse_size_report`].
pub const SIZE_FIELDS: &str = "vg_name,lv_name,lv_layout,pool_lv,lv_size,lv_metadata_size,\
                               lv_when_full,vg_extent_size,vg_free";

/// The `vgs -o` columns that [`parse_vg_report`] reads.
pub const VG_FIELDS: &str = "vg_name,vg_extent_size,vg_free,vg_size";

/// A report that does not say what we expect, naming where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("not a JSON report of the expected shape: {reason} (at line {line}: `{text}`)")]
    Shape {
        reason: String,
        line: usize,
        text: String,
    },
    #[error("row {row}: field `{field}` is {token:?}, expected {expected}")]
    Field {
        row: String,
        field: &'static str,
        token: String,
        expected: String,
    },
}

/// What kind of LV a row is, from `lv_layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LvKind {
    ThinPool,
    /// A thin volume (`thin,sparse`), snapshot or not.
    Thin,
    Other,
}

/// One row of an `lvs` report with [`LV_FIELDS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvRecord {
    pub vg: String,
    /// Kept as LVM's text: foreign LVs need not pass our name rules.
    pub name: String,
    pub kind: LvKind,
    /// `lv_layout` as reported, for messages.
    pub layout: String,
    /// The pool a thin LV lives in.
    pub pool: Option<String>,
    /// Virtual size for thin LVs, data size for thin pools.
    pub size: Bytes,
    pub tags: BTreeSet<String>,
    pub active: bool,
    pub path: Option<PathBuf>,
    /// `None` where LVM reports `""`: not applicable, or the LV is inactive.
    pub data_percent: Option<Percent>,
    pub metadata_percent: Option<Percent>,
    /// Thin pools only.
    pub metadata_size: Option<Bytes>,
    /// Thin pools only: whether writes fail at once when the pool is full
    /// (`error`) rather than queue (`queue`).
    pub errors_when_full: Option<bool>,
    pub extent_size: ExtentSize,
    pub vg_free: Bytes,
    /// The ninth character of `lv_attr` (`-` when LVM flags nothing).
    pub attr_health: char,
    /// `lv_health_status` as LVM reports it (`""` when LVM flags nothing).
    pub health_status: String,
}

/// One row of a `vgs` report with [`VG_FIELDS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgRecord {
    pub name: String,
    pub extent_size: ExtentSize,
    pub free: Bytes,
    pub size: Bytes,
}

#[derive(Deserialize)]
struct Document<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvSection {
    lv: Vec<RawLv>,
}

#[derive(Deserialize)]
struct VgSection {
    vg: Vec<RawVg>,
}

#[derive(Deserialize)]
struct RawLv {
    vg_name: String,
    lv_name: String,
    lv_layout: String,
    #[serde(default)]
    pool_lv: String,
    lv_size: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    lv_active: String,
    #[serde(default)]
    lv_path: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    metadata_percent: String,
    #[serde(default)]
    lv_metadata_size: String,
    #[serde(default)]
    lv_when_full: String,
    vg_extent_size: String,
    vg_free: String,
    #[serde(default)]
    lv_attr: String,
    #[serde(default)]
    lv_health_status: String,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_extent_size: String,
    vg_free: String,
    vg_size: String,
}

/// Parses the JSON text of `lvs --reportformat json --units b --nosuffix -o`
/// [`LV_FIELDS`].
pub fn parse_lv_report(json: &str) -> Result<Vec<LvRecord>, ReportError> {
    let document: Document<LvSection> = parse_json(json)?;
    document
        .report
        .into_iter()
        .flat_map(|section| section.lv)
        .map(LvRecord::from_raw)
        .collect()
}

/// Parses a report of [`SIZE_FIELDS`]. Its rows read as inactive, with no
/// use and nothing flagged: the caller adds the kernel's reading.
pub fn parse_size_report(json: &str) -> Result<Vec<LvRecord>, ReportError> {
    let document: Document<LvSection> = parse_json(json)?;
    document
        .report
        .into_iter()
        .flat_map(|section| section.lv)
        .map(LvRecord::from_size_row)
        .collect()
}

/// Parses the JSON text of `vgs --reportformat json --units b --nosuffix -o`
/// [`VG_FIELDS`].
pub fn parse_vg_report(json: &str) -> Result<Vec<VgRecord>, ReportError> {
    let document: Document<VgSection> = parse_json(json)?;
    document
        .report
        .into_iter()
        .flat_map(|section| section.vg)
        .map(VgRecord::from_raw)
        .collect()
}

fn parse_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, ReportError> {
    serde_json::from_str(json).map_err(|err| {
        let line = err.line();
        let text = json
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim();
        let text: String = text.chars().take(120).collect();
        ReportError::Shape {
            reason: err.to_string(),
            line,
            text,
        }
    })
}

/// Checks one row's fields, each error naming the row, field and token.
struct Row {
    label: String,
}

impl Row {
    fn error(&self, field: &'static str, token: &str, expected: impl fmt::Display) -> ReportError {
        ReportError::Field {
            row: self.label.clone(),
            field,
            token: token.to_owned(),
            expected: expected.to_string(),
        }
    }

    fn bytes(&self, field: &'static str, token: &str) -> Result<Bytes, ReportError> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error(field, token, "a byte count (--units b --nosuffix)"));
        }
        token
            .parse()
            .map(Bytes)
            .map_err(|_| self.error(field, token, "a byte count that fits 64 bits"))
    }

    /// `""` means "not applicable" for this row.
    fn optional_bytes(
        &self,
        field: &'static str,
        token: &str,
    ) -> Result<Option<Bytes>, ReportError> {
        if token.is_empty() {
            Ok(None)
        } else {
            self.bytes(field, token).map(Some)
        }
    }

    fn optional_percent(
        &self,
        field: &'static str,
        token: &str,
    ) -> Result<Option<Percent>, ReportError> {
        if token.is_empty() {
            return Ok(None);
        }
        Percent::parse_lvm(token)
            .map(Some)
            .ok_or_else(|| self.error(field, token, "a percentage such as 12.34"))
    }

    fn extent_size(&self, token: &str) -> Result<ExtentSize, ReportError> {
        let bytes = self.bytes("vg_extent_size", token)?;
        ExtentSize::new(bytes).map_err(|err| {
            self.error(
                "vg_extent_size",
                token,
                format!("a valid extent size ({err})"),
            )
        })
    }

    /// LVM joins list fields with `report/list_item_separator` (`,` by
    /// default). Items can only hold `allowed` characters, so any other
    /// character means the host configured another separator: refuse rather
    /// than misread tags (and so ownership).
    fn list(
        &self,
        field: &'static str,
        token: &str,
        allowed: fn(char) -> bool,
        described: &str,
    ) -> Result<Vec<String>, ReportError> {
        if token.is_empty() {
            return Ok(Vec::new());
        }
        let items: Vec<&str> = token.split(',').collect();
        if items
            .iter()
            .any(|item| item.is_empty() || !item.chars().all(allowed))
        {
            return Err(self.error(
                field,
                token,
                format!(
                    "a ','-separated list of {described} \
                     (is report/list_item_separator set to something else?)"
                ),
            ));
        }
        Ok(items.into_iter().map(str::to_owned).collect())
    }
}

fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c)
}

fn is_layout_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

impl LvRecord {
    fn from_size_row(mut raw: RawLv) -> Result<LvRecord, ReportError> {
        if !(raw.lv_active.is_empty() && raw.lv_attr.is_empty() && raw.data_percent.is_empty()) {
            return Err(ReportError::Shape {
                reason: "a size report carries no kernel fields".into(),
                line: 0,
                text: raw.lv_name,
            });
        }
        // Not asked for: nothing flagged (the caller reads the kernel).
        raw.lv_attr = "----------".into();
        LvRecord::from_raw(raw)
    }

    fn from_raw(raw: RawLv) -> Result<LvRecord, ReportError> {
        let row = Row {
            label: format!("{}/{}", raw.vg_name, raw.lv_name),
        };
        if raw.vg_name.is_empty() {
            return Err(row.error("vg_name", "", "a VG name"));
        }
        if raw.lv_name.is_empty() {
            return Err(row.error("lv_name", "", "an LV name"));
        }
        let layout = row.list("lv_layout", &raw.lv_layout, is_layout_char, "layout words")?;
        let has = |word: &str| layout.iter().any(|w| w == word);
        let kind = if has("thin") && has("pool") {
            LvKind::ThinPool
        } else if has("thin") && has("sparse") {
            LvKind::Thin
        } else {
            LvKind::Other
        };
        // `lv_active` is "active", "" (inactive), or "unknown" when the host
        // has activation disabled; only the first two are usable.
        let active = match raw.lv_active.as_str() {
            "active" => true,
            "" => false,
            other => return Err(row.error("lv_active", other, "\"active\" or \"\"")),
        };
        let errors_when_full = match raw.lv_when_full.as_str() {
            "error" => Some(true),
            "queue" => Some(false),
            "" => None,
            other => return Err(row.error("lv_when_full", other, "\"error\", \"queue\" or \"\"")),
        };
        // `lv_attr` is ten characters; the ninth is the volume's health.
        let attr_health = match raw.lv_attr.chars().nth(8) {
            Some(c) if c.is_ascii_graphic() => c,
            _ => return Err(row.error("lv_attr", &raw.lv_attr, "LVM's ten attribute characters")),
        };
        if !raw
            .lv_health_status
            .chars()
            .all(|c| c.is_ascii_graphic() || c == ' ')
        {
            return Err(row.error("lv_health_status", &raw.lv_health_status, "a health word"));
        }
        let tags = row
            .list("lv_tags", &raw.lv_tags, is_tag_char, "LVM tags")?
            .into_iter()
            .collect();
        Ok(LvRecord {
            size: row.bytes("lv_size", &raw.lv_size)?,
            data_percent: row.optional_percent("data_percent", &raw.data_percent)?,
            metadata_percent: row.optional_percent("metadata_percent", &raw.metadata_percent)?,
            metadata_size: row.optional_bytes("lv_metadata_size", &raw.lv_metadata_size)?,
            errors_when_full,
            extent_size: row.extent_size(&raw.vg_extent_size)?,
            vg_free: row.bytes("vg_free", &raw.vg_free)?,
            pool: (!raw.pool_lv.is_empty()).then_some(raw.pool_lv),
            path: (!raw.lv_path.is_empty()).then(|| PathBuf::from(raw.lv_path)),
            vg: raw.vg_name,
            name: raw.lv_name,
            kind,
            layout: raw.lv_layout,
            tags,
            active,
            attr_health,
            health_status: raw.lv_health_status,
        })
    }

    /// A thin pool's health from LVM's two signals (`lv_health_status` and
    /// the ninth `lv_attr` character), the worse of the two. A word or
    /// character LVM may add later reads as unknown: never as healthy.
    pub fn pool_health(&self) -> PoolHealth {
        let from_status = match self.health_status.as_str() {
            "" => PoolHealth::Healthy,
            "out_of_data" => PoolHealth::OutOfData,
            "metadata_read_only" => PoolHealth::MetadataReadOnly,
            "needs_check" => PoolHealth::NeedsCheck,
            "failed" => PoolHealth::Failed,
            _ => PoolHealth::Unknown,
        };
        let from_attr = match self.attr_health {
            '-' => PoolHealth::Healthy,
            'D' => PoolHealth::OutOfData,
            'M' => PoolHealth::MetadataReadOnly,
            'F' => PoolHealth::Failed,
            _ => PoolHealth::Unknown,
        };
        from_status.worst(from_attr)
    }

    /// A thin volume's own health: its target can only fail; `X` (or a word
    /// LVM may add later) is unknown.
    pub fn volume_health(&self) -> VolumeHealth {
        match (self.health_status.as_str(), self.attr_health) {
            ("failed", _) | (_, 'F') => VolumeHealth::Failed,
            ("", '-') => VolumeHealth::Healthy,
            _ => VolumeHealth::Unknown,
        }
    }
}

impl VgRecord {
    fn from_raw(raw: RawVg) -> Result<VgRecord, ReportError> {
        let row = Row {
            label: raw.vg_name.clone(),
        };
        if raw.vg_name.is_empty() {
            return Err(row.error("vg_name", "", "a VG name"));
        }
        Ok(VgRecord {
            extent_size: row.extent_size(&raw.vg_extent_size)?,
            free: row.bytes("vg_free", &raw.vg_free)?,
            size: row.bytes("vg_size", &raw.vg_size)?,
            name: raw.vg_name,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::units::MIB;

    /// Real captures from lvm2 2.03.16 on a device-mapper kernel; see
    /// `tests/data/README.md`.
    pub(crate) const REAL_ACTIVE: &str = include_str!("../../../tests/data/lvs-real-active.json");
    pub(crate) const REAL_INACTIVE: &str =
        include_str!("../../../tests/data/lvs-real-inactive.json");
    const REAL_VGS: &str = include_str!("../../../tests/data/vgs-real.json");

    fn named<'a>(rows: &'a [LvRecord], name: &str) -> &'a LvRecord {
        rows.iter().find(|r| r.name == name).unwrap()
    }

    /// A report of [`SIZE_FIELDS`] has only those keys: here, the real
    /// capture with every other key taken out.
    fn size_report_of(json: &str) -> String {
        let mut doc: serde_json::Value = serde_json::from_str(json).unwrap();
        let fields: Vec<&str> = SIZE_FIELDS.split(',').collect();
        for row in doc["report"][0]["lv"].as_array_mut().unwrap() {
            row.as_object_mut()
                .unwrap()
                .retain(|key, _| fields.contains(&key.as_str()));
        }
        doc.to_string()
    }

    #[test]
    fn a_size_report_gives_sizes_and_nothing_of_the_kernel() {
        let full = parse_lv_report(REAL_ACTIVE).unwrap();
        let sizes = parse_size_report(&size_report_of(REAL_ACTIVE)).unwrap();
        assert_eq!(sizes.len(), full.len());
        for (size, full) in sizes.iter().zip(&full) {
            assert_eq!(
                (
                    &size.name,
                    size.kind,
                    &size.pool,
                    size.size,
                    size.metadata_size
                ),
                (
                    &full.name,
                    full.kind,
                    &full.pool,
                    full.size,
                    full.metadata_size
                )
            );
            assert_eq!(size.errors_when_full, full.errors_when_full);
            assert!(!size.active && size.data_percent.is_none() && size.path.is_none());
            assert_eq!((size.attr_health, size.health_status.as_str()), ('-', ""));
        }
        // A report that carries the kernel's fields is not a size report.
        assert!(parse_size_report(REAL_ACTIVE).is_err());
    }

    #[test]
    fn parses_real_pool_thin_and_foreign_rows() {
        let rows = parse_lv_report(REAL_ACTIVE).unwrap();
        assert_eq!(rows.len(), 4);

        let pool = named(&rows, "pool0");
        assert_eq!(pool.kind, LvKind::ThinPool);
        assert_eq!(pool.size, Bytes(1024 * MIB));
        assert_eq!(pool.data_percent, Percent::parse_lvm("3.91"));
        assert_eq!(pool.metadata_percent, Percent::parse_lvm("11.43"));
        assert_eq!(pool.metadata_size, Some(Bytes(4 * MIB)));
        assert_eq!(pool.errors_when_full, Some(true));
        assert!(pool.active);
        // A thin pool has no device of its own.
        assert_eq!(pool.path, None);
        assert_eq!(pool.extent_size, ExtentSize::DEFAULT);
        assert_eq!(pool.vg_free, Bytes(1_052_770_304));

        let ours = named(&rows, "vmv1-vol_gjq9wcbfx7i9a3iy");
        assert_eq!(ours.kind, LvKind::Thin);
        assert_eq!(ours.pool.as_deref(), Some("pool0"));
        assert_eq!(ours.size, Bytes(30 * 1024 * MIB));
        assert_eq!(ours.data_percent, Percent::parse_lvm("0.13"));
        let tags: Vec<&str> = ours.tags.iter().map(String::as_str).collect();
        assert_eq!(tags, ["#hash", "vmv1", "vmv1.state=formatted"]);
        assert_eq!(
            ours.path.as_deref(),
            Some(std::path::Path::new(
                "/dev/vmv1smoke/vmv1-vol_gjq9wcbfx7i9a3iy"
            ))
        );
        assert_eq!(ours.errors_when_full, None);

        let foreign = named(&rows, "foreign");
        assert_eq!(foreign.kind, LvKind::Thin);
        assert!(foreign.tags.is_empty());

        let linear = named(&rows, "linear1");
        assert_eq!(linear.kind, LvKind::Other);
        assert_eq!(linear.pool, None);
        assert_eq!(linear.data_percent, None);
    }

    /// A 64 MiB pool with `--errorwhenfull y`, before and after `dd` filled
    /// it (`tests/data/README.md`).
    const REAL_SMALL: &str = include_str!("../../../tests/data/lvs-real-small.json");
    const REAL_FULL: &str = include_str!("../../../tests/data/lvs-real-full.json");

    #[test]
    fn reads_health_of_a_real_full_pool() {
        let rows = parse_lv_report(REAL_SMALL).unwrap();
        let pool = named(&rows, "pool0");
        assert_eq!((pool.attr_health, pool.health_status.as_str()), ('-', ""));
        assert_eq!(pool.pool_health(), PoolHealth::Healthy);

        let rows = parse_lv_report(REAL_FULL).unwrap();
        let pool = named(&rows, "pool0");
        assert_eq!(pool.data_percent, Percent::parse_lvm("100.00"));
        assert_eq!(pool.attr_health, 'D');
        assert_eq!(pool.health_status, "out_of_data");
        assert_eq!(pool.pool_health(), PoolHealth::OutOfData);
        // The thin LVs of a full pool are not failed themselves.
        let ours = named(&rows, "vmv1-vol_hcapture00000000");
        assert_eq!(ours.volume_health(), VolumeHealth::Healthy);
    }

    #[test]
    fn every_health_signal_maps_and_new_ones_are_unknown() {
        let health = |attr: &str, status: &str| {
            let mut row: serde_json::Value =
                serde_json::from_str(&lv_row("lv_attr", attr)).unwrap();
            row["report"][0]["lv"][0]["lv_health_status"] = status.into();
            parse_lv_report(&row.to_string()).unwrap().remove(0)
        };
        let cases = [
            ("twi-aotz--", "", PoolHealth::Healthy),
            ("twi-aotzD-", "out_of_data", PoolHealth::OutOfData),
            (
                "twi-aotzM-",
                "metadata_read_only",
                PoolHealth::MetadataReadOnly,
            ),
            ("twi-aotzF-", "failed", PoolHealth::Failed),
            ("twi-aotzX-", "", PoolHealth::Unknown),
            ("twi-aotz--", "needs_check", PoolHealth::NeedsCheck),
            // Only one of the two signals says it: the worse one counts.
            ("twi-aotzD-", "", PoolHealth::OutOfData),
            ("twi-aotz--", "something new", PoolHealth::Unknown),
        ];
        for (attr, status, expected) in cases {
            assert_eq!(
                health(attr, status).pool_health(),
                expected,
                "{attr} {status:?}"
            );
        }
        assert_eq!(
            health("Vwi-a-tzF-", "failed").volume_health(),
            VolumeHealth::Failed
        );
        assert_eq!(
            health("Vwi-a-tzX-", "").volume_health(),
            VolumeHealth::Unknown
        );
        assert_eq!(
            health("Vwi-a-tz--", "").volume_health(),
            VolumeHealth::Healthy
        );
        assert!(field_error("lv_attr", "twi").contains("`lv_attr` is \"twi\""));
    }

    #[test]
    fn parses_a_real_inactive_vg() {
        let rows = parse_lv_report(REAL_INACTIVE).unwrap();
        assert!(rows.iter().all(|r| !r.active));
        let pool = named(&rows, "pool0");
        assert_eq!(pool.kind, LvKind::ThinPool);
        assert_eq!(pool.data_percent, None);
        assert_eq!(pool.metadata_size, Some(Bytes(4 * MIB)));
        let ours = named(&rows, "vmv1-vol_gjq9wcbfx7i9a3iy");
        assert_eq!(ours.kind, LvKind::Thin);
        assert_eq!(ours.data_percent, None);
        // Hidden sub-LVs show up in an inactive VG; they are never thin.
        assert_eq!(named(&rows, "[pool0_tdata]").kind, LvKind::Other);
        assert_eq!(named(&rows, "[pool0_tmeta]").kind, LvKind::Other);
    }

    #[test]
    fn parses_real_vgs_output() {
        let vgs = parse_vg_report(REAL_VGS).unwrap();
        assert_eq!(
            vgs,
            vec![VgRecord {
                name: "vmv1smoke".into(),
                extent_size: ExtentSize::DEFAULT,
                free: Bytes(1_052_770_304),
                size: Bytes(2_143_289_344),
            }]
        );
    }

    #[test]
    fn empty_reports_are_empty() {
        let text = "{\n    \"report\": [\n        {\n            \"lv\": [\n            ]\n        }\n    ]\n}";
        assert!(parse_lv_report(text).unwrap().is_empty());
    }

    #[test]
    fn compact_output_leaves_out_empty_fields() {
        let text = r#"{"report":[{"lv":[{"vg_name":"vg0", "lv_name":"root",
            "lv_layout":"linear", "lv_size":"8388608", "vg_extent_size":"4194304",
            "vg_free":"0", "lv_attr":"-wi-------"}]}]}"#;
        let rows = parse_lv_report(text).unwrap();
        assert_eq!(rows[0].data_percent, None);
        assert!(rows[0].tags.is_empty());
        assert!(!rows[0].active);
    }

    fn lv_row(field: &str, value: &str) -> String {
        let mut row = serde_json::json!({
            "vg_name": "vg0", "lv_name": "lv0", "lv_layout": "thin,sparse",
            "pool_lv": "pool0", "lv_size": "4194304", "lv_tags": "vmv1",
            "lv_active": "active", "lv_path": "/dev/vg0/lv0", "data_percent": "0.00",
            "metadata_percent": "", "lv_metadata_size": "", "lv_when_full": "",
            "vg_extent_size": "4194304",
            "vg_free": "0", "lv_attr": "Vwi-a-tz--", "lv_health_status": ""
        });
        row[field] = serde_json::Value::String(value.to_owned());
        serde_json::json!({ "report": [{ "lv": [row] }] }).to_string()
    }

    fn field_error(field: &str, value: &str) -> String {
        let err = parse_lv_report(&lv_row(field, value)).unwrap_err();
        assert!(matches!(err, ReportError::Field { .. }), "{err}");
        err.to_string()
    }

    #[test]
    fn bad_tokens_are_named() {
        assert_eq!(
            field_error("lv_size", "4.00m"),
            "row vg0/lv0: field `lv_size` is \"4.00m\", expected a byte count (--units b --nosuffix)"
        );
        assert!(field_error("data_percent", "12.3.4").contains("`data_percent` is \"12.3.4\""));
        assert!(field_error("vg_extent_size", "1000").contains("`vg_extent_size` is \"1000\""));
        assert!(field_error("lv_active", "unknown").contains("`lv_active` is \"unknown\""));
        assert!(field_error("lv_when_full", "later").contains("`lv_when_full` is \"later\""));
        assert!(field_error("vg_free", "99999999999999999999").contains("fits 64 bits"));
        assert!(field_error("lv_tags", "vmv1;other").contains("list_item_separator"));
        assert!(field_error("lv_layout", "thin;sparse").contains("`lv_layout`"));
        assert!(field_error("lv_name", "").contains("`lv_name`"));
    }

    #[test]
    fn malformed_json_names_the_line() {
        let text = "{\n  \"report\": [\n    {\"lv\": [{\"vg_name\": \"vg0\",, }]}\n  ]\n}";
        let err = parse_lv_report(text).unwrap_err();
        match &err {
            ReportError::Shape { line, text, .. } => {
                assert_eq!(*line, 3);
                assert!(text.contains(",,"), "{err}");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn missing_required_field_is_named() {
        let mut row: serde_json::Value = serde_json::from_str(&lv_row("lv_size", "1")).unwrap();
        row["report"][0]["lv"][0]
            .as_object_mut()
            .unwrap()
            .remove("vg_extent_size");
        let err = parse_lv_report(&row.to_string()).unwrap_err().to_string();
        assert!(err.contains("missing field `vg_extent_size`"), "{err}");
    }

    #[test]
    fn a_vg_report_is_not_an_lv_report() {
        let err = parse_lv_report(REAL_VGS).unwrap_err().to_string();
        assert!(err.contains("missing field `lv`"), "{err}");
    }
}
