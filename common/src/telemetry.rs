//! Logging and OpenTelemetry set-up shared by every binary.
//!
//! - Logs: human lines on a terminal, JSON with `--log-format json` (with the trace
//!   and span ids when tracing is on); the level from `RUST_LOG` (default `info`).
//! - Traces and metrics over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or
//!   the daemon's `otlp_endpoint` key); `OTEL_SERVICE_NAME` and
//!   `OTEL_RESOURCE_ATTRIBUTES` are honoured. Off, nothing but the log layer is
//!   installed: no span is recorded for export and no context is propagated.
//! - W3C trace context travels in gRPC metadata: clients use [`TracedChannel`],
//!   servers add [`ServerTraceLayer`]; across the agent's control stream it travels
//!   in the command ([`inject_map`], [`set_parent_from_map`]).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether spans are exported (set once by [`init`]).
static ENABLED: OnceLock<bool> = OnceLock::new();

/// Whether OpenTelemetry export is on in this process.
pub fn enabled() -> bool {
    ENABLED.get().copied().unwrap_or(false)
}

/// The exporters, flushed and stopped by [`Telemetry::shutdown`].
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    meter: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("traces", &self.tracer.is_some())
            .field("metrics", &self.meter.is_some())
            .finish()
    }
}

impl Telemetry {
    /// Sends what is buffered and stops the exporters (at the end of `main`).
    pub fn shutdown(self) {
        if let Some(t) = self.tracer {
            let _ = t.force_flush();
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter {
            let _ = m.force_flush();
            let _ = m.shutdown();
        }
    }
}

/// Where to export: `OTEL_EXPORTER_OTLP_ENDPOINT` wins over the config's value.
pub fn otlp_endpoint(config: Option<&str>) -> Option<String> {
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| config.map(str::to_string))
}

/// Installs the global subscriber (logs to stderr) and, when `endpoint` is set, the
/// OTLP exporters. Must run inside the Tokio runtime when `endpoint` is set (the
/// exporter's channel lives on it). `default_level` applies when `RUST_LOG` is not
/// set; `service` is the default `service.name`.
pub fn init(
    format: LogFormat,
    default_level: &str,
    service: &str,
    endpoint: Option<String>,
) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let mut telemetry = Telemetry::default();
    let mut setup_error = None;
    let otel_layer = match endpoint {
        Some(ep) => match exporters(&ep, service) {
            Ok((tracer, meter)) => {
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(tracer.tracer(service.to_string()))
                    .with_tracked_inactivity(false);
                opentelemetry::global::set_meter_provider(meter.clone());
                crate::metrics::export_to_otel(&opentelemetry::global::meter("bulwark"));
                telemetry.tracer = Some(tracer);
                telemetry.meter = Some(meter);
                Some(layer)
            }
            Err(e) => {
                setup_error = Some(format!("OpenTelemetry export to {ep} is off: {e}"));
                None
            }
        },
        None => None,
    };
    let _ = ENABLED.set(otel_layer.is_some());
    // Spans are exported from `info` whatever the log level (the CLI logs only
    // warnings but its command span is the root of the trace).
    let otel_layer = otel_layer.map(|l| l.with_filter(EnvFilter::new("info")));
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(otel_layer);
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_target(false)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_current_span(true)
                    .with_filter(filter),
            )
            .try_init(),
    };
    if let Some(e) = setup_error {
        tracing::warn!("{e}");
    } else if enabled() {
        tracing::info!(service, "OpenTelemetry export on");
    }
    telemetry
}

fn exporters(
    endpoint: &str,
    service: &str,
) -> Result<
    (
        opentelemetry_sdk::trace::SdkTracerProvider,
        opentelemetry_sdk::metrics::SdkMeterProvider,
    ),
    String,
> {
    use opentelemetry_otlp::WithExportConfig;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let resource = resource.build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let tracer = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics).build();
    let meter = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    Ok((tracer, meter))
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The current span's trace context as W3C headers (`traceparent`), for a command
/// that travels inside a stream. Empty when export is off.
pub fn inject_map() -> HashMap<String, String> {
    let mut map = HashMap::new();
    if enabled() {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&cx, &mut map);
    }
    map
}

/// Makes `span` a child of the trace context in `map` (see [`inject_map`]) and
/// records its trace id.
pub fn set_parent_from_map(span: &tracing::Span, map: &HashMap<String, String>) {
    if enabled() && !map.is_empty() {
        let cx = TraceContextPropagator::new().extract(map);
        let _ = span.set_parent(cx);
    }
    record_trace_id(span);
}

/// Records the OpenTelemetry trace id in `span`'s `trace_id` field (declared
/// `tracing::field::Empty`), so log lines inside it (and its children, in JSON's
/// span list) carry the id to look the trace up by. Nothing when export is off.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    if enabled() {
        let id = span.context().span().span_context().trace_id();
        span.record("trace_id", tracing::field::display(id));
    }
}

/// A tonic channel that sends the current span's trace context with every call.
#[derive(Clone, Debug)]
pub struct TracedChannel(pub tonic::transport::Channel);

impl From<tonic::transport::Channel> for TracedChannel {
    fn from(c: tonic::transport::Channel) -> Self {
        TracedChannel(c)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for TracedChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future =
        <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if enabled() {
            let cx = tracing::Span::current().context();
            TraceContextPropagator::new()
                .inject_context(&cx, &mut HeaderInjector(req.headers_mut()));
        }
        tower::Service::call(&mut self.0, req)
    }
}

/// Server side: each call runs in a span (`rpc`, with the method) whose parent is
/// the caller's trace context, so the handler's spans join the caller's trace.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTraceLayer;

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner }
    }
}

/// See [`ServerTraceLayer`].
#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<tracing::instrument::Instrumented<S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !enabled() {
            return futures::future::Either::Right(self.inner.call(req));
        }
        let method = req.uri().path().to_string();
        let span = tracing::info_span!("rpc", otel.name = %method, otel.kind = "server", rpc.method = %method, trace_id = tracing::field::Empty);
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        let _ = span.set_parent(parent);
        record_trace_id(&span);
        futures::future::Either::Left(self.inner.call(req).instrument(span))
    }
}
