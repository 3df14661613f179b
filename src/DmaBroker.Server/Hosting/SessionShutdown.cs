using DmaBroker.Core;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// Ends every session when the broker stops, so each is told <c>revoked</c> and released while
/// the server still serves its stream. It does so in <see cref="StoppingAsync"/>, which the host
/// runs for every service before any <see cref="IHostedService.StopAsync"/>: the web host
/// registers its server (GenericWebHostService) after every other hosted service, so it is the
/// first to stop, and an ordinary StopAsync here would run after Kestrel had stopped taking calls.
/// </summary>
/// <remarks>
/// It waits for the Session.Open calls to complete (each counted until Kestrel has sent its
/// stream's end, the response's OnCompleted), not only for the sessions' teardown: once
/// Kestrel stops (its heartbeat first), it closes an HTTP/2 connection whose last stream ends later
/// only when the client next sends a frame, and then at once; a .NET client drops what it has
/// received but not yet read on a stream whose own side is still open when its connection closes.
/// A call still writing <c>revoked</c> when Kestrel stopped either lost it that way or held the
/// stop until the host's shutdown timeout. So once the grace has passed (on a loaded machine a
/// silent client's call can take longer than its own graces), the calls still open are told to
/// stop waiting, and the stop waits for them to complete before Kestrel stops.
/// </remarks>
internal sealed class SessionShutdown(Broker broker, SessionCalls calls, BrokerHostOptions options, TimeProvider time) : IHostedLifecycleService
{
    public async Task StoppingAsync(CancellationToken cancellationToken)
    {
        try
        {
            var ended = broker.Sessions.ShutdownAsync();
            try
            {
                await Task.WhenAll(ended, calls.WhenNoneAsync()).WaitAsync(options.ShutdownGrace, time, cancellationToken);
            }
            catch (TimeoutException)
            {
                // The calls still waiting on their clients are cut short, and the stop waits for them
                // to complete, which they then do at once: a call that completed after Kestrel had
                // stopped would hold the stop until the host's shutdown timeout (see above).
                calls.CutOverdue();
                await calls.WhenNoneAsync().WaitAsync(cancellationToken);
            }
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            // A session whose teardown or call is still running must not keep the broker from stopping.
        }
    }

    public Task StartingAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StartedAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StoppedAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
