//! `station-gui`: the touch console, a client of `stationd` (its Unix socket, named in the cell's
//! configuration or by `--connect`; or a remote daemon over mutual TLS). With `--demo` it sets
//! up a whole demo cell with emulated meters, as `station demo` does, and runs the cell's daemon
//! in this process. It shows the console in a window — fullscreen and without decorations with
//! `--kiosk`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use eframe::egui;
use gui::state::UiCommand;
use gui::theme::Touch;
use gui::{ConsoleApp, ConsoleOptions};
use station::Command;
use station::api::client::Client;
use station::demo::{DemoArgs, DemoCell};

/// The touch console of the provisioning cell.
#[derive(Parser, Debug)]
#[command(name = "station-gui", version, about)]
struct Cli {
    /// Cell configuration (to find the daemon's socket; read only).
    #[arg(long, default_value = "station.toml", env = "STATION_CONFIG")]
    config: PathBuf,
    /// The daemon: its Unix socket, or https://HOST:PORT for a remote daemon (mutual TLS).
    #[arg(long, env = "STATION_CONNECT")]
    connect: Option<String>,
    /// Remote daemon: the CA certificate its certificate chains to (PEM).
    #[arg(long, env = "STATION_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Remote daemon: this console's certificate (PEM, issued by the cell).
    #[arg(long, env = "STATION_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Remote daemon: this console's private key (PEM, an owner-only file).
    #[arg(long, env = "STATION_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Fullscreen without window decorations, for the line's touch screen.
    #[arg(long)]
    kiosk: bool,
    /// Pixel density of the screen, so that touch targets are at least 12 mm.
    #[arg(long, default_value_t = 110.0)]
    dpi: f32,
    /// Zoom factor.
    #[arg(long, default_value_t = 1.0)]
    scale: f32,
    /// Window size when not in kiosk mode, WIDTHxHEIGHT in points.
    #[arg(long, default_value = "1280x800", value_parser = parse_size)]
    size: (f32, f32),
    /// A whole demo cell on this machine: software HSM, emulated meters, an open batch.
    #[arg(long)]
    demo: bool,
    /// Directory of the demo cell (replaced if it holds an earlier demo).
    #[arg(long, default_value = "demo-gui", requires = "demo")]
    demo_out: PathBuf,
    /// Log the demo operator in and start the line at once.
    #[arg(long, requires = "demo")]
    demo_run: bool,
    /// Nests of the demo cell.
    #[arg(long, default_value_t = 4, requires = "demo", value_parser = clap::value_parser!(u32).range(1..=32))]
    nests: u32,
    /// Meters in the demo batch.
    #[arg(long, default_value_t = 20, requires = "demo", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    meters: u32,
    /// Baud rate of the demo's emulated lines.
    #[arg(long, default_value_t = 115_200, requires = "demo")]
    baud: u32,
    /// A fault for the first meter of a demo nest, e.g. "2:wrong-hash" (see `meter-sim --help`).
    #[arg(long = "fault", requires = "demo")]
    faults: Vec<String>,
}

fn parse_size(s: &str) -> Result<(f32, f32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| "sizes are WIDTHxHEIGHT, e.g. 1280x800".to_string())?;
    let p = |v: &str| {
        v.trim()
            .parse::<f32>()
            .ok()
            .filter(|v| (200.0..=10_000.0).contains(v))
            .ok_or_else(|| format!("{v:?} is not a size in points"))
    };
    Ok((p(w)?, p(h)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    station::cli::init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("station-gui: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo_args(cli: &Cli) -> DemoArgs {
    DemoArgs {
        meters: cli.meters,
        nests: cli.nests,
        baud: cli.baud,
        out: cli.demo_out.clone(),
        force: true,
        plain: true,
        known_pins: true,
        faults: cli.faults.clone(),
        ..DemoArgs::default()
    }
}

fn run(cli: Cli) -> Result<()> {
    // SoftHSM reads its configuration once, when loaded: set it before any thread starts.
    let demo = if cli.demo {
        let args = demo_args(&cli);
        station::demo::prepare(&args)?;
        Some(args)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (client, station, cell): (Client, String, Option<DemoCell>) = match demo {
        Some(args) => {
            println!(
                "station-gui: setting up a demo cell in {}",
                args.out.display()
            );
            let cell = rt.block_on(station::demo::build(&args))?;
            (cell.client.clone(), "demo-cell".into(), Some(cell))
        }
        None => {
            let addr = station::cli::address(
                cli.connect.as_deref(),
                &cli.config,
                (
                    cli.tls_ca.as_deref(),
                    cli.tls_cert.as_deref(),
                    cli.tls_key.as_deref(),
                ),
            )?;
            let station = station::config::Config::load(&cli.config)
                .map(|c| c.station_id)
                .unwrap_or_default();
            let client = rt.block_on(Client::connect(&addr, "station-gui"))?;
            (client, station, None)
        }
    };
    if cli.demo_run {
        // The demo operator starts the line; the console logs them in too (below).
        let pin = station::demo::known_pin("oper").unwrap_or_default();
        rt.block_on(async {
            let s = client.login("oper", pin).await?.session;
            client.execute(&s, Command::StartLine).await?;
            client.logout(&s).await
        })?;
    }

    let opts = ConsoleOptions {
        demo: cell.is_some(),
        touch: Touch {
            dpi: cli.dpi,
            scale: cli.scale,
        },
    };
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("Provisioning station")
        .with_app_id("station-gui")
        .with_inner_size([cli.size.0, cli.size.1])
        .with_min_inner_size([800.0, 600.0]);
    if cli.kiosk {
        viewport = viewport.with_fullscreen(true).with_decorations(false);
    }
    let native = eframe::NativeOptions {
        viewport,
        renderer: eframe::Renderer::Glow,
        // Flat colours need no dithering, which costs per pixel on a software rasteriser.
        dithering: false,
        ..eframe::NativeOptions::default()
    };
    let handle = rt.handle().clone();
    let demo_run = cli.demo_run;
    let c2 = client.clone();
    let shown = eframe::run_native(
        "station-gui",
        native,
        Box::new(move |cc| {
            let mut app = ConsoleApp::new(c2, &station, handle, &cc.egui_ctx, opts);
            if demo_run {
                let pin = station::demo::known_pin("oper").unwrap_or_default();
                app.command(UiCommand::Login {
                    user: "oper".into(),
                    pin: pin.to_string().into(),
                });
            }
            Ok(Box::new(app))
        }),
    );
    // The demo cell's daemon runs in this process: stop it cleanly.
    let shutdown = match cell {
        Some(c) => rt.block_on(c.stop()),
        None => Ok(()),
    };
    shown.map_err(|e| anyhow::anyhow!("the console window failed: {e}"))?;
    shutdown?;
    Ok(())
}
