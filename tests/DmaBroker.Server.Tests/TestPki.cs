using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace DmaBroker.Server.Tests;

/// <summary>
/// A throwaway PKI made in the test: a CA, a server certificate for 127.0.0.1 and localhost, and
/// client certificates by CN, written as PEM files (what --tls-cert, --tls-key and --client-ca read).
/// tests/DmaBroker.Benchmarks compiles this file too, for its mTLS broker.
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
