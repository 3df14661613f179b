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

    public const string Help = """
        dmactl: drive a DmaBroker from the shell.

        Usage: dmactl [--broker <url>] [--json] <command> [arguments]

        Commands:
          devices                    list PCI devices
          groups                     list IOMMU groups and their DMA owners
          group <id>                 show one group
          watch                      follow group and device changes live (Ctrl-C to stop)
          hold <group> [--iommufd]   claim a group for a new session and keep it until Ctrl-C
          bind <address> <driver>    bind a driver (admin), e.g. bind 0000:07:00.0 vfio-pci
          unbind <address>           unbind the driver (admin)
          revoke <session> [reason]  end a session; the broker releases all it held (admin)
          stats                      live sessions, containers, owned groups, watchers
          dma <address> [--bytes N]  claim a device and run a DMA round trip through the IOMMU
          bench <address> [--size B] [--seconds N]
                                     measure DMA write throughput, with progress

        Options:
          --broker <url>   the broker [env DMABROKER_ADDRESS, default http://127.0.0.1:50051]
          --json           machine-readable output (one JSON object per line for watch)
          -h, --help       this help; 'dmactl <command> --help' for one command

        Exit codes: 0 ok, 1 the broker rejected the request (the errno is printed),
                    2 usage error, 3 the broker is unreachable.
        """;

    public static async Task<int> RunAsync(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var rest = new List<string>();
        string? broker = Environment.GetEnvironmentVariable(BrokerClient.AddressVariable);
        var json = false;
        for (var i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--broker" when i + 1 < args.Length:
                    broker = args[++i];
                    break;
                case "--broker":
                    return Fail(stderr, Usage, "--broker needs a URL, e.g. --broker http://127.0.0.1:50051");
                case "--json":
                    json = true;
                    break;
                default:
                    rest.Add(args[i]);
                    break;
            }
        }
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
            using var client = BrokerClient.Connect(broker);
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

    private static int Fail(TextWriter stderr, int code, string message)
    {
        stderr.WriteLine($"dmactl: {message}");
        return code;
    }
}

/// <summary>A command-line mistake; exit code 2.</summary>
internal sealed class UsageException(string message) : Exception(message);
