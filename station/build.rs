//! Generates the service API's Rust code from its contract, `schemas/station.proto`, with a
//! protobuf compiler written in Rust: no system `protoc` is needed. Also holds the requirement
//! map, `schemas/requirements.toml`, to its rule: a requirement that applies names at least one
//! test, and one that does not apply says why; otherwise the build stops, naming it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../schemas/station.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../schemas"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    let map = "../schemas/requirements.toml";
    println!("cargo:rerun-if-changed={map}");
    let problems = requirement_problems(&std::fs::read_to_string(map)?);
    if !problems.is_empty() {
        return Err(format!("{map}:\n  {}", problems.join("\n  ")).into());
    }
    Ok(())
}

/// The map's rule, read line by line (the station's own reader checks the rest when it loads
/// the map; this only needs `id`, `applies`, `tests` and `reason` of each `[[requirement]]`).
fn requirement_problems(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for block in text.split("[[requirement]]").skip(1) {
        let mut id = "?".to_string();
        let mut applies = None;
        let mut tests = 0usize;
        let mut reason = false;
        let mut in_tests = false;
        for line in block.lines() {
            let line = line.trim();
            if line.starts_with('[')
                && !line.starts_with("[[")
                && !in_tests
                && line.ends_with(']')
                && !line.contains('=')
            {
                break;
            }
            if in_tests {
                tests += line.matches("::").count();
                if line.contains(']') {
                    in_tests = false;
                }
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "id" => id = v.trim_matches('"').to_string(),
                "applies" => applies = Some(v == "true"),
                "reason" => reason = !v.trim_matches('"').trim().is_empty(),
                "tests" => {
                    tests += v.matches("::").count();
                    in_tests = !v.contains(']');
                }
                _ => {}
            }
        }
        match applies {
            Some(true) if tests == 0 => {
                out.push(format!("requirement {id} applies, but no test proves it"))
            }
            Some(false) if !reason => {
                out.push(format!("requirement {id} does not apply, but says not why"))
            }
            None => out.push(format!("requirement {id} says not whether it applies")),
            _ => {}
        }
    }
    out
}
