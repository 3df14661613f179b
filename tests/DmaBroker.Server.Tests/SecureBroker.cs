using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using DmaBroker.Client;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DmaBroker.Server.Tests;

/// <summary>
/// A broker with an auth file and three real listeners: HTTP/2 cleartext on loopback, TLS that
/// requires client certificates from <see cref="Pki"/>, and a Unix socket. Connect as a bearer
/// token, a certificate, the socket's uid, or anonymous. Like <see cref="TestBroker"/>, disposing it
/// fails the test if the broker logged an error the test did not declare with <see cref="ExpectErrors"/>.
/// </summary>
public sealed class SecureBroker : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly List<BrokerClient> _clients = [];

    private SecureBroker(WebApplication app, BrokerLog log, string directory, TestPki pki, string authFile, string http, string https, string socket)
    {
        _app = app;
        Log = log;
        Directory = directory;
        Pki = pki;
        AuthFile = authFile;
        Http = http;
        Https = https;
        Socket = socket;
        Broker = app.Services.GetRequiredService<Core.Broker>();
        Access = app.Services.GetRequiredService<AccessControl>();
    }

    public string Directory { get; }
    public TestPki Pki { get; }
    public string AuthFile { get; }
    public string Http { get; }
    public string Https { get; }
    public string Socket { get; }

    /// <summary>The <c>--http-listen</c> address (cleartext HTTP/1.1 on loopback).</summary>
    public string Web => _app.WebAddress() ?? throw new InvalidOperationException("the web listener is off");
    public Core.Broker Broker { get; }
    public AccessControl Access { get; }

    /// <summary>Everything the broker logged at Warning or above.</summary>
    public BrokerLog Log { get; }

    /// <summary>Declares errors the broker may log in this test.</summary>
    public void ExpectErrors(Func<BrokerLogRecord, bool> match) => Log.ExpectErrors(match);

    /// <summary>The SHA-256 of a token as the auth file stores it.</summary>
    public static string Sha256(string token) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(token)));

    public static async Task<SecureBroker> StartAsync(string authJson, params string[] args)
    {
        var directory = System.IO.Directory.CreateTempSubdirectory("dmabroker-auth-").FullName;
        var pki = new TestPki(directory);
        var authFile = Path.Combine(directory, "auth.json");
        await File.WriteAllTextAsync(authFile, authJson);
        var socket = Path.Combine(directory, "broker.sock");
        var log = new BrokerLog();
        var app = BrokerHost.Build([
            "--listen", "http://127.0.0.1:0", "--listen", "https://127.0.0.1:0", "--listen", $"unix://{socket}", "--http-listen", "http://127.0.0.1:0",
            "--auth-file", authFile, "--tls-cert", pki.ServerCertFile, "--tls-key", pki.ServerKeyFile, "--client-ca", pki.CaFile,
            "--Logging:LogLevel:Default=Warning", .. args], services => services.AddLogging(logging => logging.AddProvider(log)));
        await app.StartAsync();
        var addresses = app.Addresses();
        return new SecureBroker(app, log, directory, pki, authFile, addresses.Single(a => a.StartsWith("http://127.0.0.1:", StringComparison.Ordinal)),
            addresses.Single(a => a.StartsWith("https://", StringComparison.Ordinal)), $"unix://{socket}");
    }

    /// <summary>A client on the cleartext listener, with a bearer token or none (anonymous).</summary>
    public BrokerClient Connect(string? token = null) => Keep(BrokerClient.Connect(Http, new BrokerClientOptions { BearerToken = token }));

    /// <summary>A client on the TLS listener with a client certificate (or none), trusting the test CA.</summary>
    public BrokerClient ConnectTls(X509Certificate2? certificate, string? token = null) =>
        Keep(BrokerClient.Connect(Https, new BrokerClientOptions { TrustedAuthorities = Pki.Authorities, ClientCertificate = certificate, BearerToken = token }));

    /// <summary>A client on the Unix socket: the broker knows it by this process's uid.</summary>
    public BrokerClient ConnectUnix(string? token = null) => Keep(BrokerClient.Connect(Socket, new BrokerClientOptions { BearerToken = token }));

    private BrokerClient Keep(BrokerClient client)
    {
        _clients.Add(client);
        return client;
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var client in _clients)
            client.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
        System.IO.Directory.Delete(Directory, recursive: true);
        Log.VerifyNoUnexpectedErrors();
    }
}
