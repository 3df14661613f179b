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
/// A throwaway PKI made in the test: a CA, a server certificate for 127.0.0.1 and localhost, and
/// client certificates by CN, written as PEM files (what --tls-cert, --tls-key and --client-ca read).
/// </summary>
public sealed class TestPki
{
    private readonly X509Certificate2 _ca;

    public TestPki(string directory, string name = "DmaBroker test CA")
    {
        Directory = directory;
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        _ca = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-2), DateTimeOffset.UtcNow.AddDays(60));
        CaFile = Write("ca.pem", _ca.ExportCertificatePem());
        Authorities = [X509CertificateLoader.LoadCertificate(_ca.RawData)];
        (ServerCertFile, ServerKeyFile, _) = Issue("server", "127.0.0.1", serverAuth: true);
    }

    public string Directory { get; }
    public string CaFile { get; }
    public string ServerCertFile { get; }
    public string ServerKeyFile { get; }

    /// <summary>The CA, for clients that must trust the server's certificate.</summary>
    public X509Certificate2Collection Authorities { get; }

    /// <summary>A client certificate with its key, CN = <paramref name="commonName"/>, issued by this CA.</summary>
    public X509Certificate2 Client(string commonName)
    {
        var (cert, key, _) = Issue($"client-{commonName}", commonName, serverAuth: false);
        return X509Certificate2.CreateFromPemFile(cert, key);
    }

    private (string Cert, string Key, X509Certificate2 Certificate) Issue(string file, string commonName, bool serverAuth)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest($"CN={commonName}", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, false));
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
            [new Oid(serverAuth ? "1.3.6.1.5.5.7.3.1" : "1.3.6.1.5.5.7.3.2")], false));
        if (serverAuth)
        {
            var names = new SubjectAlternativeNameBuilder();
            names.AddIpAddress(System.Net.IPAddress.Loopback);
            names.AddDnsName("localhost");
            request.CertificateExtensions.Add(names.Build());
        }
        var serial = RandomNumberGenerator.GetBytes(12);
        using var issued = request.Create(_ca, DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30), serial);
        var certificate = issued.CopyWithPrivateKey(key);
        return (Write($"{file}.pem", certificate.ExportCertificatePem()), Write($"{file}.key", key.ExportPkcs8PrivateKeyPem()), certificate);
    }

    private string Write(string name, string pem)
    {
        var path = Path.Combine(Directory, name);
        File.WriteAllText(path, pem);
        return path;
    }
}

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
            "--listen", "http://127.0.0.1:0", "--listen", "https://127.0.0.1:0", "--listen", $"unix://{socket}",
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
