//! `station-gui`: the touch console. Opens the cell (or, with `--demo`, sets up a whole demo cell
//! with emulated meters, as `station demo` does), runs the engine on a tokio runtime and shows
//! the console in a window — fullscreen and without decorations with `--kiosk`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use eframe::egui;
use gui::state::UiCommand;
use gui::theme::Touch;
use gui::{ConsoleApp, ConsoleOptions};
use station::config::Config;
use station::demo::{DemoArgs, DemoCell};
use station::{Command, Engine, OpenOptions};

/// The touch console of the provisioning cell.
#[derive(Parser, Debug)]
#[command(name = "station-gui", version, about)]
struct Cli {
    /// Cell configuration.
    #[arg(long, default_value = "station.toml", env = "STATION_CONFIG")]
    config: PathBuf,
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

/// Where the cell comes from.
enum Source {
    Demo(DemoArgs),
    Config(Box<Config>),
}

fn run(cli: Cli) -> Result<()> {
    // SoftHSM reads its configuration once, when loaded: set it before any thread starts.
    let cell = if cli.demo {
        let args = demo_args(&cli);
        station::demo::prepare(&args)?;
        Source::Demo(args)
    } else {
        let cfg = Config::load(&cli.config)?;
        if let Some(conf) = &cfg.hsm.softhsm_conf {
            hsm::softhsm::use_conf(conf);
        }
        Source::Config(Box::new(cfg))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (engine, cell): (Engine, Option<DemoCell>) = match cell {
        Source::Demo(args) => {
            println!(
                "station-gui: setting up a demo cell in {}",
                args.out.display()
            );
            let cell = rt.block_on(station::demo::build(&args))?;
            (cell.engine.clone(), Some(cell))
        }
        Source::Config(cfg) => {
            let opts = OpenOptions {
                source: "gui".into(),
                nests: true,
            };
            (rt.block_on(Engine::open(*cfg, opts))?, None)
        }
    };
    if cli.demo_run {
        // The demo operator starts the line; the console logs them in too (below).
        let pin = station::demo::known_pin("oper").unwrap_or_default();
        rt.block_on(async {
            let s = engine.login("oper", pin).await?;
            engine.execute(&s, Command::StartLine).await?;
            engine.logout(&s).await
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
    let e2 = engine.clone();
    let shown = eframe::run_native(
        "station-gui",
        native,
        Box::new(move |cc| {
            let mut app = ConsoleApp::new(&e2, handle, &cc.egui_ctx, opts);
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
    let shutdown = rt.block_on(engine.shutdown());
    drop(cell);
    shown.map_err(|e| anyhow::anyhow!("the console window failed: {e}"))?;
    shutdown?;
    Ok(())
}
