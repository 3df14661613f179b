using System.CommandLine;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using DmaBroker.Client;

namespace DmaBroker.Ctl;

/// <summary>Where the broker is and how to prove who we are: the global options.</summary>
internal sealed record ConnectionSettings(string? Broker, string? Token, FileInfo? CaFile, FileInfo? CertFile, FileInfo? KeyFile)
{
    public string Address => string.IsNullOrWhiteSpace(Broker) ? BrokerClient.DefaultAddress : Broker;

    /// <summary>A client for the broker; files that cannot be read, or a lone --cert or --key, are usage errors.</summary>
    public BrokerClient Connect()
    {
        if ((CertFile is null) != (KeyFile is null))
            throw new UsageException("--cert and --key go together: the client certificate and its private key, both PEM", showUsage: false);
        BrokerClientOptions options;
        try
        {
            X509Certificate2Collection? authorities = null;
            if (CaFile is not null)
            {
                authorities = [];
                authorities.ImportFromPemFile(CaFile.FullName);
            }
            options = new BrokerClientOptions
            {
                BearerToken = string.IsNullOrEmpty(Token) ? null : Token,
                TrustedAuthorities = authorities,
                ClientCertificate = CertFile is null ? null : X509Certificate2.CreateFromPemFile(CertFile.FullName, KeyFile!.FullName),
            };
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or CryptographicException)
        {
            throw new UsageException($"cannot load the TLS files: {e.Message}", showUsage: false);
        }
        return BrokerClient.Connect(Broker, options);
    }
}

/// <summary>What a running command has: its parsed arguments, its output, the broker (connected on first use) and Ctrl-C.</summary>
internal sealed class CommandContext(ParseResult parse, Output output, ConnectionSettings connection, CancellationToken stop) : IDisposable
{
    private BrokerClient? _client;

    public Output Output => output;

    /// <summary>Cancelled by Ctrl-C.</summary>
    public CancellationToken Stop => stop;

    public string BrokerAddress => connection.Address;

    /// <summary>The broker; the channel is made on first use, so commands that need none (version) start fast.</summary>
    public BrokerClient Client => _client ??= connection.Connect();

    public T Value<T>(Argument<T> argument) => parse.GetValue(argument)!;

    public T Value<T>(Option<T> option) => parse.GetValue(option)!;

    public void Dispose() => _client?.Dispose();
}
