using System.CommandLine;
using System.CommandLine.Invocation;
using System.Net.Sockets;
using System.Reflection;
using System.Security.Authentication;
using DmaBroker.Client;
using Grpc.Core;

namespace DmaBroker.Ctl;

/// <summary>dmactl's entry: the command tree, global options, and how failures become exit codes.</summary>
internal static class Cli
{
    public const int Ok = 0;
    public const int Rejected = 1;
    public const int Usage = 2;
    public const int Unreachable = 3;

    /// <summary>The environment variable that holds a bearer token, as --token does.</summary>
    public const string TokenVariable = "DMABROKER_TOKEN";

    /// <summary>dmactl's version: the project's (and the tool package's) version.</summary>
    public static string Version { get; } =
        typeof(Cli).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "0.0.0";

    public static readonly Option<string?> Broker = Global<string?>("--broker", "url",
        $"The broker: http://host:port, https://host:port, host:port (http) or unix:///path [env {BrokerClient.AddressVariable}, default {BrokerClient.DefaultAddress}]");

    public static readonly Option<string?> Token = Global<string?>("--token", "token", $"A bearer token from the broker's auth file [env {TokenVariable}]");

    public static readonly Option<FileInfo?> CaCert = Global<FileInfo?>("--cacert", "pem", "CA certificate(s), PEM, that vouch for an https:// broker");

    public static readonly Option<FileInfo?> Cert = Global<FileInfo?>("--cert", "pem", "A client certificate, PEM, for a broker that requires mTLS (with --key)");

    public static readonly Option<FileInfo?> Key = Global<FileInfo?>("--key", "pem", "The client certificate's private key, PEM");

    public static readonly Option<bool> Json = new("--json")
    {
        Description = "Machine-readable output: one compact JSON document (watch: one per line); errors as JSON on stderr",
        Recursive = true,
        Arity = ArgumentArity.Zero, // a flag: the word after it is never its value (nor completed as True/False)
    };

    /// <summary>An option every command takes, before or after the command's name.</summary>
    private static Option<T> Global<T>(string name, string helpName, string description) =>
        new(name) { Description = description, HelpName = helpName, Recursive = true };

    public static async Task<int> RunAsync(string[] args)
    {
        var root = Commands.Root();
        var parse = root.Parse(args);
        if (parse.Action is ParseErrorAction)
            return Output.ForConsole(parse.GetValue(Json)).Fail(UsageError(parse));
        return await parse.InvokeAsync(new InvocationConfiguration
        {
            EnableDefaultExceptionHandler = false,
            // dmactl handles Ctrl-C itself: hold must release its group and say so before it exits 0.
            ProcessTerminationTimeout = null,
        });
    }

    /// <summary>Makes <paramref name="command"/> run <paramref name="run"/>, turning what it throws into exit codes.</summary>
    public static void Handle(Command command, Func<CommandContext, Task<int>> run) =>
        command.SetAction((parse, _) => InvokeAsync(parse, run));

    private static async Task<int> InvokeAsync(ParseResult parse, Func<CommandContext, Task<int>> run)
    {
        var output = Output.ForConsole(parse.GetValue(Json));
        var connection = new ConnectionSettings(
            parse.GetValue(Broker) ?? Environment.GetEnvironmentVariable(BrokerClient.AddressVariable),
            parse.GetValue(Token) ?? Environment.GetEnvironmentVariable(TokenVariable),
            parse.GetValue(CaCert), parse.GetValue(Cert), parse.GetValue(Key));
        using var stop = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true;
            stop.Cancel();
        };
        Console.CancelKeyPress += onCancel;
        using var context = new CommandContext(parse, output, connection, stop.Token);
        try
        {
            return await run(context);
        }
        catch (UsageException e)
        {
            return output.Fail(Failure.Usage(e.Message, e.ShowUsage ? $"Usage: {UsageLine(parse.CommandResult.Command)}" : null));
        }
        catch (ArgumentException e)
        {
            // A bad --broker; its message without .NET's "(Parameter 'address')".
            return output.Fail(Failure.Usage(e.ParamName is null ? e.Message : e.Message.Replace($" (Parameter '{e.ParamName}')", "", StringComparison.Ordinal)));
        }
        catch (BrokerUnavailableException e)
        {
            return output.Fail(Failure.Unreachable($"cannot reach the broker at {connection.Address}", e));
        }
        catch (BrokerException e)
        {
            return output.Fail(Failure.Rejected(e));
        }
        catch (DmaFaultException e)
        {
            return output.Fail(Failure.DmaFault(e));
        }
        catch (RpcException e) when (e.StatusCode is StatusCode.Unavailable or StatusCode.DeadlineExceeded)
        {
            return output.Fail(Failure.Unreachable($"cannot reach the broker at {connection.Address}", e));
        }
        catch (Exception e) when (e is HttpRequestException or SocketException or AuthenticationException)
        {
            return output.Fail(Failure.Unreachable($"cannot reach the broker at {connection.Address}", e));
        }
        catch (Exception e) when (stop.IsCancellationRequested && e is OperationCanceledException or RpcException { StatusCode: StatusCode.Cancelled })
        {
            // Ctrl-C: what the command was doing is done with.
            return Ok;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
    }

    /// <summary>The parser's complaints as one usage failure, with a "did you mean" for a mistyped command.</summary>
    private static Failure UsageError(ParseResult parse)
    {
        var command = parse.CommandResult.Command;
        var message = string.Join("; ", parse.Errors.Select(e => e.Message.TrimEnd('.')));
        if (command is RootCommand && parse.UnmatchedTokens is [var word, ..] && !word.StartsWith('-'))
        {
            message = $"unknown command '{word}'";
            if (Spelling.Closest(word, command.Subcommands.Select(c => c.Name)) is { } closest)
                message += $"; did you mean '{closest}'?";
        }
        return Failure.Usage(message, $"Usage: {UsageLine(command)}\nRun '{Path(command)} --help' for more.");
    }

    /// <summary>A command's usage line, as its help shows it: <c>dmactl group &lt;id&gt; [options]</c>.</summary>
    private static string UsageLine(Command command)
    {
        var words = new List<string> { Path(command) };
        words.AddRange(command.Arguments.Select(a => a.Arity.MinimumNumberOfValues == 0 ? $"[<{a.Name}>...]" : $"<{a.Name}>"));
        if (command.Subcommands.Count > 0)
            words.Add("<command>");
        words.Add("[options]");
        return string.Join(' ', words);
    }

    private static string Path(Command command) =>
        command is RootCommand ? "dmactl" : $"{Path((Command)command.Parents.First())} {command.Name}";
}

/// <summary>A command-line mistake found while running a command (exit code 2).</summary>
internal sealed class UsageException(string message, bool showUsage = true) : Exception(message)
{
    public bool ShowUsage { get; } = showUsage;
}
