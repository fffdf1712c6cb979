//! A certificate's validity period (notBefore, notAfter), read from its DER, so that `serve`
//! can warn at start about an expired certificate (or one not valid yet).
//!
//! Neither rustls nor webpki exposes these dates, and a whole X.509 parser (x509-parser and
//! its parser-combinator stack) would be a dependency for two fields: this walks the few
//! fixed DER elements before them (RFC 5280 4.1) and nothing else. Anything unexpected yields
//! `None`, and the caller simply does not warn.

/// Seconds since the Unix epoch of a certificate's notBefore and notAfter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// The validity of the DER certificate `der`, if it parses.
pub fn of(der: &[u8]) -> Option<Validity> {
    let (certificate, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(certificate, SEQUENCE)?;
    // version [0] EXPLICIT, optional (absent means v1).
    if tbs.first() == Some(&0xA0) {
        tbs = element(tbs, 0xA0)?.1;
    }
    let tbs = element(tbs, INTEGER)?.1; // serialNumber
    let tbs = element(tbs, SEQUENCE)?.1; // signature AlgorithmIdentifier
    let tbs = element(tbs, SEQUENCE)?.1; // issuer Name
    let (validity, _) = element(tbs, SEQUENCE)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

const INTEGER: u8 = 0x02;
const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The contents of the element at the start of `der` if its tag is `tag`, and what follows it.
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = der.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else {
        let count = usize::from(len & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A UTCTime or GeneralizedTime at the start of `der`, in seconds since the epoch.
fn time(der: &[u8]) -> Option<(i64, &[u8])> {
    let (text, rest, year_digits) = match *der.first()? {
        UTC_TIME => {
            let (text, rest) = element(der, UTC_TIME)?;
            (text, rest, 2)
        }
        GENERALIZED_TIME => {
            let (text, rest) = element(der, GENERALIZED_TIME)?;
            (text, rest, 4)
        }
        _ => return None,
    };
    // YY(YY)MMDDHHMMSSZ: DER requires seconds and a Z.
    if text.len() != year_digits + 11 || text.last() != Some(&b'Z') {
        return None;
    }
    let number = |from: usize, len: usize| -> Option<i64> {
        let digits = std::str::from_utf8(text.get(from..from + len)?).ok()?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let mut year = number(0, year_digits)?;
    if year_digits == 2 {
        // RFC 5280: 50..99 are 19xx, 00..49 are 20xx.
        year += if year >= 50 { 1900 } else { 2000 };
    }
    let at = year_digits;
    let (month, day) = (number(at, 2)?, number(at + 2, 2)?);
    let (hour, minute, second) = (number(at + 4, 2)?, number(at + 6, 2)?, number(at + 8, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second, rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12; // March is 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A date for a log line: `YYYY-MM-DD` of `seconds` since the epoch (UTC).
pub fn date(seconds: i64) -> String {
    // The inverse of `days_from_civil`.
    let days = seconds.div_euclid(86_400) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(days_from_civil(4096, 1, 1) * 86_400), "4096-01-01");
    }

    #[test]
    fn reads_a_generated_certificate_s_dates() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2001, 2, 3);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let validity = of(cert.der()).expect("dates");
        assert_eq!(date(validity.not_before), "2001-02-03");
        assert_eq!(date(validity.not_after), "2049-12-31");
        // rcgen writes GeneralizedTime from 2050 on.
        params.not_after = rcgen::date_time_ymd(2051, 6, 7);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(date(of(cert.der()).unwrap().not_after), "2051-06-07");
    }

    #[test]
    fn garbage_gives_none() {
        assert_eq!(of(b""), None);
        assert_eq!(of(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(of(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
