using System.Net;
using System.Security.Cryptography.X509Certificates;
using DmaBroker.Core;
using DmaBroker.Core.Access;
using Microsoft.AspNetCore.Connections.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// The HTTP/1.1 listener of <c>--http-listen</c> (SPEC §13): <c>GET /metrics</c>, <c>GET /</c>
/// and <c>GET /events</c> for operators and their browsers and scrapers, apart from the gRPC
/// listeners. An endpoint marked <see cref="WebListenerExtensions.OnWebListener{T}"/> answers only
/// on this listener, and nothing else does: gRPC is not served here, and the web endpoints are
/// not served on gRPC listeners. Every request here needs the viewer role, authenticated as gRPC
/// calls are (a bearer token, the TLS client certificate, or <c>anonymous</c>), and also by a
/// bearer token sent as the password of HTTP Basic authentication, which browsers ask for and
/// then send with every request of the page, its EventSource included.
/// </summary>
public sealed class WebListener
{
    /// <summary>The default address: loopback, the port Prometheus exporters conventionally use.</summary>
    public const string DefaultAddress = "http://127.0.0.1:9464";

    /// <summary>The value of <c>--http-listen</c> that turns the listener off.</summary>
    public const string Off = "none";

    private const string ConnectionMark = "dmabroker.web-listener";
    private ListenOptions? _bound;

    private WebListener(Listener? listener) => Listener = listener;

    /// <summary>The parsed address, or null when the listener is off.</summary>
    public Listener? Listener { get; }

    /// <summary>Parses <c>--http-listen</c>: an http://, https:// or unix:// address, or <c>none</c>.</summary>
    public static WebListener Parse(string? text) =>
        string.IsNullOrWhiteSpace(text) || text.Equals(Off, StringComparison.OrdinalIgnoreCase)
            ? new WebListener(null)
            : new WebListener(Listener.Parse(text, "--http-listen"));

    /// <summary>Adds the listener to Kestrel (after the gRPC listeners), marking its connections.</summary>
    public void Configure(KestrelServerOptions kestrel, X509Certificate2? serverCertificate, bool clientCertificates)
    {
        if (Listener is null)
            return;
        // Browsers speak HTTP/2 only over TLS; over cleartext this is HTTP/1.1 for curl and Prometheus.
        var protocols = Listener.Kind == ListenerKind.Https ? HttpProtocols.Http1AndHttp2 : HttpProtocols.Http1;
        Listener.Configure(kestrel, serverCertificate, clientCertificates, protocols, options =>
        {
            _bound = options;
            options.Use(next => connection =>
            {
                connection.Items[ConnectionMark] = true;
                return next(connection);
            });
        });
    }

    /// <summary>The address the started listener serves, with the port the OS gave; null when off.</summary>
    public string? Address => Listener is null || _bound is null
        ? null
        : Listener.Kind == ListenerKind.Unix
            ? Listener.Text
            : $"{(Listener.Kind == ListenerKind.Https ? "https" : "http")}://{Host(_bound)}";

    private static string Host(ListenOptions bound) => bound.EndPoint switch
    {
        IPEndPoint ip => ip.Address.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{ip.Address}]:{ip.Port}" : $"{ip.Address}:{ip.Port}",
        var other => other.ToString() ?? "?",
    };

    /// <summary>True for a request that arrived on this listener.</summary>
    public static bool Carries(HttpContext http) =>
        http.Features.Get<IConnectionItemsFeature>()?.Items.ContainsKey(ConnectionMark) == true;

    /// <summary>
    /// Middleware, after routing: keeps web endpoints and gRPC apart, then checks the viewer role
    /// for what this listener serves. Refusals are plain text with the status a browser or
    /// scraper understands: 401 (with <c>WWW-Authenticate: Bearer</c>) or 403.
    /// </summary>
    public static Task GateAsync(HttpContext http, RequestDelegate next)
    {
        var web = http.GetEndpoint()?.Metadata.GetMetadata<WebEndpointMarker>() is not null;
        if (web != Carries(http))
        {
            http.Response.StatusCode = StatusCodes.Status404NotFound;
            return http.Response.WriteAsync(web
                ? $"{http.Request.Path} is served on the --http-listen address, not on gRPC listeners\n"
                : $"{http.Request.Path} is not served here: this is the --http-listen address (/, /events, /metrics); gRPC is on the --listen addresses\n");
        }
        if (!web)
            return next(http);
        var gate = http.RequestServices.GetRequiredService<AccessGate>();
        try
        {
            // Basic too: a browser asks its user for it and sends it with the page's EventSource.
            var grant = gate.Authenticate(http, basic: true);
            if (!grant.Permits(Role.Viewer))
                throw ErrnoException.Denied($"{grant.Principal} may not read {ErrnoException.Quote(http.Request.Path.Value)}: it needs the viewer role");
            http.Features.Set(new Caller(grant));
        }
        catch (ErrnoException e)
        {
            http.Response.StatusCode = e.Errno == Errno.EACCES && e.Kind == ErrorKind.Unauthenticated
                ? StatusCodes.Status401Unauthorized
                : StatusCodes.Status403Forbidden;
            // Basic makes a browser ask for the token (as the password); scripts send it as Bearer.
            if (http.Response.StatusCode == StatusCodes.Status401Unauthorized)
                http.Response.Headers.WWWAuthenticate = new(["Basic realm=\"dmabroker\", charset=\"UTF-8\"", "Bearer realm=\"dmabroker\""]);
            return http.Response.WriteAsync($"{e.Errno}: {e.Message}\n");
        }
        return next(http);
    }
}

/// <summary>Endpoint metadata: served only on the <c>--http-listen</c> listener.</summary>
public sealed class WebEndpointMarker
{
    internal static readonly WebEndpointMarker Instance = new();

    private WebEndpointMarker()
    {
    }
}

/// <summary>Marks endpoints for the web listener.</summary>
public static class WebListenerExtensions
{
    /// <summary>Serves this endpoint only on the <c>--http-listen</c> listener, to callers with the viewer role.</summary>
    public static T OnWebListener<T>(this T builder) where T : IEndpointConventionBuilder =>
        builder.WithMetadata(WebEndpointMarker.Instance);
}
