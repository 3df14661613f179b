using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Channels;

namespace DmaBroker.Integration.Tests;

/// <summary>A real dmactl process: its output lines as a stream, and POSIX signals.</summary>
public sealed partial class ClientProcess : IAsyncDisposable
{
    private const int SigKill = 9;
    private const int SigCont = 18;
    private const int SigStop = 19;

    private readonly Process _process;
    private readonly Channel<string> _lines = Channel.CreateUnbounded<string>();

    private ClientProcess(Process process)
    {
        _process = process;
        _process.OutputDataReceived += (_, e) => Push(e.Data);
        _process.ErrorDataReceived += (_, e) => Push(e.Data is null ? null : "stderr: " + e.Data);
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public int Pid => _process.Id;

    /// <summary>Starts <c>dotnet dmactl.dll --broker address args…</c>.</summary>
    public static ClientProcess StartDmactl(string brokerAddress, params string[] args)
    {
        var dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet";
        var start = new ProcessStartInfo(dotnet)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dmactl.dll"));
        start.ArgumentList.Add("--broker");
        start.ArgumentList.Add(brokerAddress);
        foreach (var a in args)
            start.ArgumentList.Add(a);
        return new ClientProcess(Process.Start(start) ?? throw new InvalidOperationException("could not start dmactl"));
    }

    /// <summary>Waits for an output line containing <paramref name="text"/>; fails on exit or timeout.</summary>
    public async Task<string> WaitForLineAsync(string text, TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        var seen = new List<string>();
        try
        {
            await foreach (var line in _lines.Reader.ReadAllAsync(cts.Token))
            {
                if (line.Contains(text, StringComparison.Ordinal))
                    return line;
                seen.Add(line);
            }
        }
        catch (OperationCanceledException)
        {
            // Reported below with what was seen.
        }
        throw new Xunit.Sdk.XunitException($"dmactl (pid {Pid}) never printed '{text}'; it printed:\n{string.Join('\n', seen)}");
    }

    public void Kill() => Signal(SigKill);

    public void Stop() => Signal(SigStop);

    public void Continue() => Signal(SigCont);

    private void Signal(int signal)
    {
        if (Kill(_process.Id, signal) != 0)
            throw new InvalidOperationException($"kill({_process.Id}, {signal}) failed: errno {Marshal.GetLastPInvokeError()}");
    }

    private void Push(string? line)
    {
        if (line is null)
            _lines.Writer.TryComplete();
        else
            _lines.Writer.TryWrite(line);
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
        }
        _process.Dispose();
    }

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);
}
