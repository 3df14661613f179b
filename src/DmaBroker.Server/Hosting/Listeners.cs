using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using DmaBroker.Core;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.AspNetCore.Server.Kestrel.Https;

namespace DmaBroker.Server.Hosting;

/// <summary>How a listener carries gRPC.</summary>
public enum ListenerKind
{
    /// <summary><c>http://</c>: HTTP/2 cleartext (prior knowledge).</summary>
    Http,
    /// <summary><c>https://</c>: HTTP/2 over TLS, with client certificates when <c>--client-ca</c> is given.</summary>
    Https,
    /// <summary><c>unix:///path</c>: HTTP/2 cleartext over a Unix domain socket; the principal is the peer's uid.</summary>
    Unix,
}

/// <summary>One <c>--listen</c> address: <c>http://host:port</c>, <c>https://host:port</c> or <c>unix:///absolute/path</c>.</summary>
public sealed record Listener(ListenerKind Kind, string Text, IPAddress? Address, bool AnyAddress, bool Localhost, int Port, string? SocketPath)
{
    /// <summary>The option that gave it (<c>--listen</c> or <c>--http-listen</c>), which errors name.</summary>
    public string Option { get; init; } = "--listen";

    /// <summary>
    /// True when only this host can reach it: a loopback address, <c>localhost</c>, or a Unix
    /// socket. Open mode (no auth file) is refused anywhere else unless <c>--insecure</c>.
    /// </summary>
    public bool IsLocal => Kind == ListenerKind.Unix || Localhost || (Address is not null && IPAddress.IsLoopback(Address));

    /// <summary>Parses a listen address, or throws <see cref="ArgumentException"/> naming the accepted forms.</summary>
    public static Listener Parse(string text) => Parse(text, "--listen");

    /// <summary>Parses the address given to <paramref name="option"/>, which its errors name.</summary>
    public static Listener Parse(string text, string option)
    {
        const string Forms = "http://127.0.0.1:50051, https://0.0.0.0:50443 or unix:///run/dmabroker.sock";
        if (text.StartsWith("unix:", StringComparison.OrdinalIgnoreCase))
        {
            var path = text["unix:".Length..];
            if (path.StartsWith("//", StringComparison.Ordinal))
                path = path[2..];
            if (!path.StartsWith('/') || path.Length < 2 || path.EndsWith('/'))
                throw new ArgumentException($"{option} {ErrnoException.Quote(text)}: a Unix socket is unix:///absolute/path, for example unix:///run/dmabroker.sock");
            return new Listener(ListenerKind.Unix, text, null, false, false, 0, path) { Option = option };
        }
        if (!Uri.TryCreate(text, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https")
            || uri.AbsolutePath != "/" || uri.Query.Length > 0 || uri.UserInfo.Length > 0)
            throw new ArgumentException($"{option} takes an address such as {Forms}; got {ErrnoException.Quote(text)}");
        if (uri.IsDefaultPort && !text.Contains($":{uri.Port}", StringComparison.Ordinal))
            throw new ArgumentException($"{option} {ErrnoException.Quote(text)}: give the port, for example {uri.Scheme}://{uri.Host}:50051");
        var kind = uri.Scheme == "https" ? ListenerKind.Https : ListenerKind.Http;
        var host = uri.Host.Trim('[', ']');
        if (host is "localhost")
            return new Listener(kind, text, null, false, true, uri.Port, null) { Option = option };
        if (host is "*" or "+" or "0.0.0.0" or "::")
            return new Listener(kind, text, host == "::" ? IPAddress.IPv6Any : IPAddress.Any, true, false, uri.Port, null) { Option = option };
        if (!IPAddress.TryParse(host, out var address))
            throw new ArgumentException($"{option} {ErrnoException.Quote(text)}: the host must be an IP address, localhost or 0.0.0.0");
        return new Listener(kind, text, address, false, false, uri.Port, null) { Option = option };
    }

    /// <summary>Adds this listener to Kestrel: HTTP/2 everywhere; TLS with the server certificate where asked.</summary>
    public void Configure(KestrelServerOptions kestrel, X509Certificate2? serverCertificate, bool clientCertificates) =>
        Configure(kestrel, serverCertificate, clientCertificates, HttpProtocols.Http2, null);

    /// <summary>
    /// Adds this listener to Kestrel speaking <paramref name="protocols"/>; <paramref name="more"/>
    /// sees its <see cref="ListenOptions"/> after the rest is set (connection middleware, say).
    /// </summary>
    public void Configure(KestrelServerOptions kestrel, X509Certificate2? serverCertificate, bool clientCertificates,
        HttpProtocols protocols, Action<ListenOptions>? more)
    {
        void Options(ListenOptions o)
        {
            o.Protocols = protocols;
            more?.Invoke(o);
            if (Kind != ListenerKind.Https)
                return;
            o.UseHttps(https =>
            {
                https.ServerCertificate = serverCertificate ?? throw new ArgumentException($"--listen {Text} needs --tls-cert and --tls-key");
                if (clientCertificates)
                {
                    // Checked per call by ClientCertificateTrust, so a bad certificate gets a gRPC error with a reason.
                    https.ClientCertificateMode = ClientCertificateMode.AllowCertificate;
                    https.AllowAnyClientCertificate();
                }
            });
        }

        if (Kind == ListenerKind.Unix)
        {
            RemoveStaleSocket(SocketPath!, Option);
            kestrel.ListenUnixSocket(SocketPath!, Options);
        }
        else if (Localhost)
        {
            kestrel.ListenLocalhost(Port, Options);
        }
        else
        {
            kestrel.Listen(Address!, Port, Options);
        }
    }

    /// <summary>
    /// A socket file left by a broker that died would make the bind fail; one that a live broker
    /// still answers on is in use, and stays.
    /// </summary>
    private static void RemoveStaleSocket(string path, string option)
    {
        if (!File.Exists(path))
            return;
        if ((File.GetAttributes(path) & FileAttributes.Device) == 0 && new FileInfo(path).Length > 0)
            throw new ArgumentException($"{option} unix://{path}: the path exists and is not a socket");
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException)
        {
            File.Delete(path);
            return;
        }
        throw new IOException($"{option} unix://{path}: address already in use (another broker answers there)");
    }
}
