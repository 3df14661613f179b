using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using DmaBroker.Client;
using Grpc.Core;

namespace DmaBroker.Ctl;

/// <summary>dmactl's entry: global options, command dispatch and exit codes.</summary>
internal static class Cli
{
    public const int Ok = 0;
    public const int Rejected = 1;
    public const int Usage = 2;
    public const int Unavailable = 3;

    /// <summary>The environment variable that holds a bearer token, as --token does.</summary>
    public const string TokenVariable = "DMABROKER_TOKEN";

    public const string Help = """
        dmactl: drive a DmaBroker from the shell.

        Usage: dmactl [--broker <url>] [credentials] [--json] <command> [arguments]

        Commands:
          devices                    list PCI devices
          groups                     list IOMMU groups and their DMA owners
          group <id>                 show one group
          watch                      follow group and device changes live (Ctrl-C to stop)
          hold <group> [--iommufd]   claim a group for a new session and keep it until Ctrl-C
          bind <address> <driver>    bind a driver (admin), e.g. bind 0000:07:00.0 vfio-pci
          unbind <address>           unbind the driver (admin)
          revoke <session> [reason]  end a session; the broker releases all it held
                                     (admin: any session; user: its own)
          sessions                   live sessions: principal, client, peer, age, what they hold
          stats                      live sessions, containers, owned groups, watchers
          dma <address> [--bytes N]  claim a device and run a DMA round trip through the IOMMU
          bench <address> [--size B] [--seconds N]
                                     measure DMA write throughput, with progress

        Options:
          --broker <url>   the broker: http://host:port, https://host:port or unix:///path
                           [env DMABROKER_ADDRESS, default http://127.0.0.1:50051]
          --token <token>  a bearer token from the broker's auth file [env DMABROKER_TOKEN]
          --cacert <pem>   CA certificate(s) that vouch for an https:// broker
          --cert <pem>     a client certificate for a broker that requires mTLS (with --key)
          --key <pem>      the client certificate's private key
          --json           machine-readable output (one JSON object per line for watch)
          -h, --help       this help; 'dmactl <command> --help' for one command

        Exit codes: 0 ok, 1 the broker rejected the request (the errno is printed),
                    2 usage error, 3 the broker is unreachable.
        """;

    public static async Task<int> RunAsync(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var rest = new List<string>();
        string? broker = Environment.GetEnvironmentVariable(BrokerClient.AddressVariable);
        string? token = Environment.GetEnvironmentVariable(TokenVariable);
        string? caFile = null, certFile = null, keyFile = null;
        var json = false;
        for (var i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--broker" or "--token" or "--cacert" or "--cert" or "--key" when i + 1 >= args.Length || args[i + 1].StartsWith("--", StringComparison.Ordinal):
                    return Fail(stderr, Usage, $"{args[i]} needs a value; run 'dmactl --help'");
                case "--broker":
                    broker = args[++i];
                    break;
                case "--token":
                    token = args[++i];
                    break;
                case "--cacert":
                    caFile = args[++i];
                    break;
                case "--cert":
                    certFile = args[++i];
                    break;
                case "--key":
                    keyFile = args[++i];
                    break;
                case "--json":
                    json = true;
                    break;
                default:
                    rest.Add(args[i]);
                    break;
            }
        }
        if ((certFile is null) != (keyFile is null))
            return Fail(stderr, Usage, "--cert and --key go together: the client certificate and its private key, both PEM");
        if (rest.Count == 0 || rest[0] is "-h" or "--help" or "help")
        {
            stdout.WriteLine(Help);
            return rest.Count == 0 ? Usage : Ok;
        }
        var command = Commands.Find(rest[0]);
        if (command is null)
            return Fail(stderr, Usage, $"unknown command '{rest[0]}'; run 'dmactl --help'");
        var commandArgs = rest.Skip(1).ToArray();
        if (commandArgs.Contains("--help") || commandArgs.Contains("-h"))
        {
            stdout.WriteLine($"Usage: dmactl {command.Usage}\n\n{command.Summary}");
            return Ok;
        }

        using var stop = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true;
            stop.Cancel();
        };
        Console.CancelKeyPress += onCancel;
        try
        {
            using var client = BrokerClient.Connect(broker, Credentials(token, caFile, certFile, keyFile));
            var output = new Output(stdout, json);
            return await command.RunAsync(new CommandContext(client, output, commandArgs, stderr, stop.Token));
        }
        catch (UsageException e)
        {
            return Fail(stderr, Usage, $"{e.Message}\nUsage: dmactl {command.Usage}");
        }
        catch (ArgumentException e)
        {
            return Fail(stderr, Usage, e.Message);
        }
        catch (BrokerUnavailableException e)
        {
            return Fail(stderr, Unavailable, $"cannot reach the broker at {broker ?? BrokerClient.DefaultAddress}: {e.Message}");
        }
        catch (BrokerException e)
        {
            return Fail(stderr, Rejected, $"{e.Reason}: {e.Message}");
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.Unavailable)
        {
            return Fail(stderr, Unavailable, $"cannot reach the broker at {broker ?? BrokerClient.DefaultAddress}: {e.Status.Detail}");
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            return Ok;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
    }

    /// <summary>The connection options the credential flags ask for; files that cannot be read are usage errors.</summary>
    private static BrokerClientOptions Credentials(string? token, string? caFile, string? certFile, string? keyFile)
    {
        try
        {
            X509Certificate2Collection? authorities = null;
            if (caFile is not null)
            {
                authorities = [];
                authorities.ImportFromPemFile(caFile);
            }
            return new BrokerClientOptions
            {
                BearerToken = string.IsNullOrEmpty(token) ? null : token,
                TrustedAuthorities = authorities,
                ClientCertificate = certFile is null ? null : X509Certificate2.CreateFromPemFile(certFile, keyFile),
            };
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or CryptographicException)
        {
            throw new ArgumentException($"cannot load the TLS files: {e.Message}", e);
        }
    }

    private static int Fail(TextWriter stderr, int code, string message)
    {
        stderr.WriteLine($"dmactl: {message}");
        return code;
    }
}

/// <summary>A command-line mistake; exit code 2.</summary>
internal sealed class UsageException(string message) : Exception(message);
