using System.Diagnostics;
using System.Diagnostics.Tracing;
using System.Globalization;
using System.Reflection;
using System.Threading.Channels;
using DmaBroker.Client;
using Microsoft.Diagnostics.NETCore.Client;

namespace DmaBroker.Benchmarks;

/// <summary>
/// A process the benchmarks start: the real broker (<c>dotnet DmaBroker.Server.dll</c> from its
/// own output folder) or one of this program's child modes (<see cref="BenchChild"/>). Its stdout
/// lines as a stream, stdin for commands; disposing it kills it by its id.
/// </summary>
internal sealed class ChildProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly Channel<string> _lines = Channel.CreateUnbounded<string>();

    private ChildProcess(Process process)
    {
        _process = process;
        _process.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null)
                _lines.Writer.TryComplete();
            else
                _lines.Writer.TryWrite(e.Data);
        };
        // The broker's warnings and the children's errors go where the benchmark's own go.
        _process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
                Console.Error.WriteLine($"[pid {process.Id}] {e.Data}");
        };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public int Pid => _process.Id;

    /// <summary>Starts <c>dotnet <paramref name="dll"/> args…</c> with stdin open for commands.</summary>
    public static ChildProcess Start(string dll, params IEnumerable<string> args) =>
        StartProgram(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet", [dll, .. args]);

    /// <summary>Starts <paramref name="program"/> (looked up on PATH) with stdin open for commands.</summary>
    public static ChildProcess StartProgram(string program, params IEnumerable<string> args)
    {
        var start = new ProcessStartInfo(program)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
            start.ArgumentList.Add(a);
        try
        {
            return new ChildProcess(Process.Start(start) ?? throw new InvalidOperationException($"could not start {program}"));
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"could not start {program}: {e.Message}", e);
        }
    }

    /// <summary>Starts this program in one of its child modes (<see cref="BenchChild"/>).</summary>
    public static ChildProcess StartChild(params IEnumerable<string> args) =>
        Start(typeof(ChildProcess).Assembly.Location, [BenchChild.Mode, .. args]);

    /// <summary>Waits for a line that starts with <paramref name="prefix"/> and returns what follows it.</summary>
    public async Task<string> WaitForLineAsync(string prefix, TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await foreach (var line in _lines.Reader.ReadAllAsync(cts.Token))
            {
                var at = line.IndexOf(prefix, StringComparison.Ordinal);
                if (at >= 0)
                    return line[(at + prefix.Length)..];
            }
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"pid {Pid} did not print '{prefix}' within {timeout}");
        }
        throw new InvalidOperationException($"pid {Pid} exited without printing '{prefix}'");
    }

    /// <summary>Sends a command line to the child's stdin.</summary>
    public async Task SendAsync(string command)
    {
        await _process.StandardInput.WriteLineAsync(command);
        await _process.StandardInput.FlushAsync();
    }

    /// <summary>SIGKILL (what <see cref="Process.Kill()"/> sends on Linux): the process dies at once, closing nothing itself.</summary>
    public void Kill() => _process.Kill();

    /// <summary>The process's resident set, from /proc/&lt;pid&gt;/status (VmRSS), in bytes.</summary>
    public long ResidentBytes()
    {
        var line = File.ReadLines($"/proc/{Pid}/status").First(l => l.StartsWith("VmRSS:", StringComparison.Ordinal));
        return long.Parse(line["VmRSS:".Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) * 1024;
    }

    /// <summary>
    /// Has the runtime in the process run a full blocking collection, as dotnet-gcdump does (an
    /// EventPipe session with the GC-heap-collect keyword), and waits until its GC events have come.
    /// </summary>
    public async Task CollectGarbageAsync()
    {
        const long GcKeyword = 0x1, GcHeapCollectKeyword = 0x800000;
        var client = new DiagnosticsClient(Pid);
        using var session = client.StartEventPipeSession(
            new EventPipeProvider("Microsoft-Windows-DotNETRuntime", EventLevel.Informational, GcKeyword | GcHeapCollectKeyword), requestRundown: false);
        // The induced collection runs once the session is up; its events (a few KiB) follow. Read
        // the stream for a moment, so the collection has finished, then stop the session.
        var drain = Task.Run(async () =>
        {
            var buffer = new byte[64 * 1024];
            try
            {
                while (await session.EventStream.ReadAsync(buffer) > 0)
                {
                }
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException)
            {
                // The session stopped.
            }
        });
        await Task.Delay(TimeSpan.FromSeconds(1.5));
        await session.StopAsync(CancellationToken.None);
        await drain.WaitAsync(TimeSpan.FromSeconds(10));
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        _process.Dispose();
    }
}

/// <summary>A broker process on a loopback port the OS chose, with its /metrics listener, and a client connected to it.</summary>
internal sealed class BrokerProcess : IAsyncDisposable
{
    /// <summary>
    /// The broker's assembly in its own output folder (the build writes its path into this
    /// assembly), or the one <c>DMABROKER_BENCH_BROKER</c> names: another build, to compare.
    /// </summary>
    private static readonly string AssemblyPath = Environment.GetEnvironmentVariable("DMABROKER_BENCH_BROKER") is { Length: > 0 } other
        ? other
        : typeof(BrokerProcess).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "BrokerAssemblyPath").Value!;

    private static readonly TimeSpan StartupTimeout = TimeSpan.FromSeconds(60);

    private BrokerProcess(ChildProcess process, string address, string webAddress)
    {
        Process = process;
        Address = address;
        WebAddress = webAddress;
        Client = BrokerClient.Connect(address);
    }

    public ChildProcess Process { get; }

    public string Address { get; }

    /// <summary>Its <c>--http-listen</c> address (/metrics).</summary>
    public string WebAddress { get; }

    public BrokerClient Client { get; }

    /// <summary>Starts a broker with further <paramref name="options"/> and returns once it answers.</summary>
    public static async Task<BrokerProcess> StartAsync(params string[] options)
    {
        var process = ChildProcess.Start(AssemblyPath, ["--listen", "http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0",
            "--Logging:LogLevel:Default=Warning", "--Logging:LogLevel:Microsoft.Hosting.Lifetime=Information",
            "--Logging:LogLevel:DmaBroker.Server.Startup=Information", .. options]);
        try
        {
            var address = (await process.WaitForLineAsync("Now listening on: ", StartupTimeout)).Trim();
            var web = await process.WaitForLineAsync("live view on ", StartupTimeout);
            var broker = new BrokerProcess(process, address, web[..web.IndexOf(';', StringComparison.Ordinal)]);
            await broker.Client.Admin.GetStatsAsync().WaitAsync(StartupTimeout);
            return broker;
        }
        catch
        {
            await process.DisposeAsync();
            throw;
        }
    }

    /// <summary>
    /// Waits until the broker counts <paramref name="sessions"/> live sessions, polling its stats
    /// every few milliseconds; returns the stats then.
    /// </summary>
    public async Task<Protocol.V1.BrokerStats> WaitForSessionsAsync(uint sessions, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var stats = await Client.Admin.GetStatsAsync();
            if (stats.Sessions == sessions)
                return stats;
            if (clock.Elapsed > timeout)
                throw new TimeoutException($"the broker still has {stats.Sessions} sessions after {timeout}, not {sessions}; sessions ended so far, by reason: {await EndReasonsAsync()}");
            await Task.Delay(5);
        }
    }

    /// <summary>How many sessions have ended, by reason, from /metrics (the release-duration histogram's counts).</summary>
    public async Task<string> EndReasonsAsync()
    {
        using var http = new HttpClient();
        var text = await http.GetStringAsync($"{WebAddress.TrimEnd('/')}/metrics");
        return string.Join("; ", text.Split('\n').Where(l => l.StartsWith("dmabroker_session_release_duration_seconds_count", StringComparison.Ordinal)));
    }

    /// <summary>The managed heap after the last collection, summed over generations, from /metrics (the runtime's own meter).</summary>
    public async Task<long> ManagedHeapAfterLastGcAsync()
    {
        using var http = new HttpClient();
        var text = await http.GetStringAsync($"{WebAddress.TrimEnd('/')}/metrics");
        long total = 0;
        foreach (var line in text.Split('\n'))
        {
            if (line.StartsWith("dotnet_gc_last_collection_heap_size_bytes{", StringComparison.Ordinal))
                total += (long)double.Parse(line[(line.LastIndexOf('}') + 1)..].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
        }
        return total;
    }

    public async ValueTask DisposeAsync()
    {
        Client.Dispose();
        await Process.DisposeAsync();
    }
}
